"""The NVFlare internals transport.py and fl_server.py rely on (listed in transport.py's docstring) are still there,
as they are in the pinned NVFlare 2.9.0: an upgrade that changes one fails here, naming it, not silently in a job."""

import inspect
from pathlib import Path

import pytest

REQUIREMENTS = Path(__file__).resolve().parents[1] / "requirements.txt"


DOWNLOAD_OBJECT = ("from_fqcn", "ref_id", "per_request_timeout", "cell", "consumer", "secure", "optional",
                   "abort_signal", "progress_cb")  # fmt: skip


def parameters(function) -> list[str]:
    return [name for name in inspect.signature(function).parameters if name != "self"]


def test_the_pinned_version_is_installed():
    import nvflare

    pinned = next(line.split("==")[1] for line in REQUIREMENTS.read_text().splitlines() if line.startswith("nvflare=="))
    assert nvflare.__version__ == pinned, (
        f"nvflare {nvflare.__version__} is installed, requirements.txt pins {pinned}: check the internals listed in "
        "transport.py's docstring against it (this file's other tests), then update the pin"
    )


def test_the_disk_offload_settings_keep_their_names():
    from nvflare.app_common.utils import tensor_disk_offload_context as offload

    assert getattr(offload, "_TENSOR_DISK_OFFLOAD_ROOT_DIR", None) == "tensor_disk_offload_root_dir", (
        "nvflare.app_common.utils.tensor_disk_offload_context._TENSOR_DISK_OFFLOAD_ROOT_DIR changed: transport.py "
        "names the offload folder with it (DiskTensorDecomposer, share_disk_offload_with_job_cell)"
    )


def test_the_tensor_decomposer_methods_transport_replaces_keep_their_parameters():
    from nvflare.app_opt.pt.decomposers import TensorDecomposer

    download = ["from_fqcn", "ref_id", "per_request_timeout", "cell", "use_disk", "root_dir", "secure", "optional",
                "abort_signal", "progress_cb"]  # fmt: skip
    assert parameters(TensorDecomposer._download) == download, (
        f"TensorDecomposer._download now takes {parameters(TensorDecomposer._download)}: "
        "transport.GroupedTensorDecomposer._download replaces it with the old parameters"
    )
    assert parameters(TensorDecomposer.to_downloadable) == ["items", "max_chunk_size", "fobs_ctx"], (
        "TensorDecomposer.to_downloadable changed: transport.GroupedTensorDecomposer.to_downloadable replaces it"
    )


def test_the_download_pieces_transport_builds_on_keep_their_interfaces():
    from nvflare.app_opt.pt.lazy_tensor_dict import LazyTensorDict
    from nvflare.app_opt.pt.tensor_downloader import DiskTensorConsumer, TensorConsumer
    from nvflare.fuel.f3.streaming.cacheable import CacheableObject
    from nvflare.fuel.f3.streaming.download_service import Consumer, download_object

    checks = {
        "download_object's parameters": set(DOWNLOAD_OBJECT) <= set(parameters(download_object)),
        "LazyTensorDict(key_to_file=, temp_dir=)": {"key_to_file", "temp_dir"} <= set(parameters(LazyTensorDict)),
        "DiskTensorConsumer(temp_dir) with cleanup() and release()": parameters(DiskTensorConsumer)[:1] == ["temp_dir"]
        and all(callable(getattr(DiskTensorConsumer, m, None)) for m in ("cleanup", "release", "consume")),
        "TensorConsumer(.., ..) with consume()": len(parameters(TensorConsumer)) >= 2
        and callable(getattr(TensorConsumer, "consume", None)),
        "Consumer's consume/download_completed/download_failed": all(
            callable(getattr(Consumer, m, None)) for m in ("consume", "download_completed", "download_failed")
        ),
        "CacheableObject(obj, max_chunk_size) and its item methods": parameters(CacheableObject)[:2]
        == ["obj", "max_chunk_size"]
        and all(
            callable(getattr(CacheableObject, m, None))
            for m in ("produce_item", "get_item_count", "get_item_size", "prefetch_item", "release")
        ),
    }
    changed = [what for what, ok in checks.items() if not ok]
    assert not changed, f"NVFlare changed what transport.py builds on: {changed}"


def test_the_server_deep_copies_a_broadcast_tasks_data_with_copy_deepcopy():
    from nvflare.apis.impl import wf_comm_server

    source = inspect.getsource(wf_comm_server)
    assert "copy.deepcopy(task.data)" in source, (
        "NVFlare's wf_comm_server no longer deep-copies a broadcast task's data: transport.sent_as_is (which makes "
        "that copy a no-op for the global model) may no longer be needed"
    )


def test_the_simulator_engine_and_the_persistor_keep_what_fl_server_uses():
    from nvflare.app_opt.pt.file_model_persistor import PTFileModelPersistor
    from nvflare.private.fed.simulator.simulator_server import SimulatorServer

    assert "self.job_cell" in inspect.getsource(SimulatorServer), (
        "NVFlare's simulator server no longer holds its job cell at `job_cell`: "
        "transport.share_disk_offload_with_job_cell reads it there"
    )
    persistor_source = inspect.getsource(PTFileModelPersistor)
    missing = [name for name in ("_get_persistence_manager", "_ckpt_save_path", "save_model_file")
               if name not in persistor_source]  # fmt: skip
    assert not missing, f"PTFileModelPersistor no longer has {missing}: fl_server.QwenPersistor uses them"


def test_fedavg_keeps_the_hooks_fault_tolerant_fedavg_overrides():
    from nvflare.app_common.workflows.fedavg import FedAvg
    from nvflare.app_opt.pt.recipes.fedavg import FedAvgRecipe

    expected = {
        FedAvg._accept_train_result: ["client_name", "result", "fl_ctx", "is_unknown_task"],
        FedAvg._aggregate_one_result: ["result"],
        FedAvg._get_aggregated_result: [],
        FedAvg.send_model: ["task_name", "data", "targets", "min_responses", "timeout", "callback"],
        FedAvgRecipe._create_controller: ["persistor_id", "model_params", "model_aggregator"],
    }
    changed = [f.__qualname__ for f, names in expected.items() if parameters(f) != names]
    assert not changed, f"NVFlare changed {changed}: fl_server.FaultTolerantFedAvg and job.py's recipe override them"
    broadcast = set(parameters(FedAvg.broadcast_model))
    assert {"min_responses", "wait_time_after_min_received", "blocking", "callback"} <= broadcast
    assert "self.send_model(" in inspect.getsource(FedAvg.run), "FedAvg.run no longer sends a round with send_model"


def test_fedavg_waits_for_a_rounds_last_result_the_task_check_period_fault_tolerant_fedavg_sets():
    from nvflare.app_common.workflows.fedavg import FedAvg

    from fl_server import TASK_CHECK_PERIOD, FaultTolerantFedAvg

    assert "time.sleep(self._task_check_period)" in inspect.getsource(FedAvg.run), (
        "FedAvg.run no longer sleeps task_check_period between its checks: fl_server.FaultTolerantFedAvg shortens it"
    )
    assert FaultTolerantFedAvg(num_clients=2, num_rounds=1)._task_check_period == TASK_CHECK_PERIOD
    assert "while self.get_num_standing_tasks():" in inspect.getsource(FedAvg.run), (
        "FedAvg.run no longer waits for every task of a round: FaultTolerantFedAvg sends a round as two tasks"
    )


@pytest.mark.parametrize("first", ["transport", "nvflare"])
def test_fobs_keeps_the_first_tensor_decomposer_registered(first, tmp_path):
    """What receive_to_disk and serialize_once_for_all_sites rely on, in a fresh process each time."""
    import subprocess
    import sys

    code = f"""
import transport
from nvflare.app_opt.pt.decomposers import TensorDecomposer
from nvflare.fuel.utils import fobs
from nvflare.fuel.utils.fobs import dots
if {first!r} == "nvflare":
    fobs.register(TensorDecomposer())
print(transport.receive_to_disk({str(tmp_path)!r}))
"""
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == [str(first == "transport")], "FOBS no longer keeps the first decomposer registered"
