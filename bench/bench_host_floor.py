"""Benchmark: what the host itself allows an exchange, below NVFlare: loopback TCP through one Python stream, the
cost of a fresh page (the kernel's fault and zero-fill on first touch), and a copy into a reused buffer. 2 GiB each.
With a GPU, also the host page faults of loading a 622 MB bf16 tensor (the 2B model's embedding) into an fp32 GPU
tensor by a direct `copy_` and by moving it to the GPU first (what the trainer does).
Usage: python bench/bench_host_floor.py
"""

import json
import mmap
import resource
import socket
import threading
import time

TOTAL = 2 * 2**30
CHUNK = 2**20
PAGE = 4096


def loopback_tcp_mb_per_s() -> float:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)

    def send() -> None:
        with socket.create_connection(server.getsockname()) as client:
            chunk = memoryview(bytearray(CHUNK))
            for _ in range(TOTAL // CHUNK):
                client.sendall(chunk)

    threading.Thread(target=send, daemon=True).start()
    conn, _ = server.accept()
    buffer, received, start = bytearray(CHUNK), 0, time.perf_counter()
    while received < TOTAL and (n := conn.recv_into(buffer)):
        received += n
    return received / (time.perf_counter() - start) / 1e6


def fresh_page_us() -> float:
    start = time.perf_counter()
    memory = mmap.mmap(-1, TOTAL)
    for offset in range(0, TOTAL, PAGE):
        memory[offset] = 1
    seconds = time.perf_counter() - start
    memory.close()
    return seconds / (TOTAL // PAGE) * 1e6


def reused_copy_mb_per_s() -> float:
    source, target = bytes(16 * CHUNK), bytearray(16 * CHUNK)
    target[:] = source  # first touch outside the timing
    start = time.perf_counter()
    for _ in range(TOTAL // len(source)):
        target[:] = source
    return TOTAL / (time.perf_counter() - start) / 1e6


def gpu_load_page_faults() -> dict:
    import torch

    if not torch.cuda.is_available():
        return {}
    host = torch.ones(151936, 2048, dtype=torch.bfloat16)
    model = torch.zeros(host.shape, dtype=torch.float32, device="cuda")
    faults = {}
    loads = {"direct_copy_": lambda: model.copy_(host), "to_gpu_then_cast": lambda: model.copy_(host.to("cuda"))}
    for name, load in loads.items():
        load()
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        load()
        torch.cuda.synchronize()
        faults[f"embedding_load_host_page_faults_{name}"] = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    return faults


if __name__ == "__main__":
    print(json.dumps({
        "loopback_tcp_one_python_stream_MB_per_s": round(loopback_tcp_mb_per_s()),
        "fresh_page_fault_us_per_4KiB": round(fresh_page_us(), 2),
        "copy_into_reused_buffer_MB_per_s": round(reused_copy_mb_per_s()),
        **gpu_load_page_faults(),
    }))  # fmt: skip
