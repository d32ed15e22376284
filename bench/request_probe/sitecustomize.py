"""Timing probe of NVFlare's download requests, for `--probe` of bench_fl_round.py and bench_transfer.py.

On PYTHONPATH with $PROBE_DIR set, every Python process of the run patches NVFlare's cell and download service as it
imports them, and appends one line per event to $PROBE_DIR/<pid>.txt, "<kind> <pid> <start> <seconds>":
`rtt` (a requester's `send_request` on the download channel, request out until reply in), `transit` (that request's
way to the producer) and `handle` (the producer's download handler). The first line names the process. A probe must
never break the run: if NVFlare's internals differ, it prints why and measures nothing.
"""

import importlib.abc
import importlib.machinery
import os
import sys
import threading
import time

_DIR = os.environ.get("PROBE_DIR")
_SERVICE = "nvflare.fuel.f3.streaming.download_service"
_lock = threading.Lock()
_file = None


def _log(kind: str, start: float, seconds: float) -> None:
    global _file
    with _lock:
        if _file is None:
            _file = open(os.path.join(_DIR, f"{os.getpid()}.txt"), "a", buffering=1)
            _file.write(f"argv {os.getpid()} 0 0 {' '.join(sys.argv)[:200]}\n")
        _file.write(f"{kind} {os.getpid()} {start:.6f} {seconds:.6f}\n")


def _install(service) -> None:
    from nvflare.fuel.f3.cellnet.cell import Cell

    send = Cell._send_request  # Cell.send_request resolves to it on stream channels, the download's among them

    def timed_send(self, channel, *args, **kwargs):
        start = time.time()
        request = kwargs.get("request", args[2] if len(args) > 2 else None)
        if channel == service.OBJ_DOWNLOADER_CHANNEL and request is not None:
            request.set_header("probe_sent", start)
        try:
            return send(self, channel, *args, **kwargs)
        finally:
            if channel == service.OBJ_DOWNLOADER_CHANNEL:
                _log("rtt", start, time.time() - start)

    handle = service.DownloadService._handle_download.__func__

    def timed_handle(cls, request):
        start = time.time()
        sent = request.get_header("probe_sent")
        if sent:
            _log("transit", sent, start - sent)
        try:
            return handle(cls, request)
        finally:
            _log("handle", start, time.time() - start)

    Cell._send_request = timed_send
    service.DownloadService._handle_download = classmethod(timed_handle)


class _PatchOnImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != _SERVICE:
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        run_module = spec.loader.exec_module

        def exec_module(module):
            run_module(module)
            try:
                _install(module)
            except Exception as e:
                print(f"request probe: not installed ({e!r})", file=sys.stderr)

        spec.loader.exec_module = exec_module
        return spec


if _DIR:
    sys.meta_path.insert(0, _PatchOnImport())
