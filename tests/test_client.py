"""client.py on its own: the global weights are received to disk from the first task on."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHECK = """
import sys
from pathlib import Path
from types import SimpleNamespace
import client
from nvflare.app_opt.pt.decomposers import TensorDecomposer
from nvflare.client.config import ExchangeFormat
from nvflare.client.decomposers import register_framework_decomposers
from nvflare.fuel.utils import fobs
from nvflare.fuel.utils.fobs import FOBSContextKey, dots

folder = Path(sys.argv[1])
print("registered", client.receive_to_disk(folder))
register_framework_decomposers(ExchangeFormat.PYTORCH, ExchangeFormat.PYTORCH, None)  # what flare.init does next
handler = fobs.get_dot_handler(dots.TENSOR_DOWNLOAD)
print("still ours", isinstance(handler, client.DiskTensorDecomposer))

calls = []
TensorDecomposer._download = staticmethod(lambda **kw: calls.append(kw))  # records where the download would go
cell = SimpleNamespace(get_fobs_context=lambda: {})  # a cell whose own context says nothing about offload
handler.download("server", "ref", 10.0, cell=cell, fobs_ctx={FOBSContextKey.TENSOR_DISK_OFFLOAD: False})
print("to disk", calls[0]["use_disk"], calls[0]["root_dir"] == str(folder), folder.is_dir())
"""


def test_received_weights_go_to_disk_even_before_the_client_api_is_initialised(tmp_path):
    out = subprocess.run(
        [sys.executable, "-c", CHECK, str(tmp_path / "received")], cwd=ROOT, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split("\n")[:3] == ["registered True", "still ours True", "to disk True True True"]
