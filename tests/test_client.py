"""client.py on its own: the global weights are received to disk from the first task on."""

import functools
import gc
import subprocess
import sys
from pathlib import Path

from transport import KEEPS, NOT_SENT, HeldWeights

ROOT = Path(__file__).resolve().parents[1]

CHECK = """
import sys
from pathlib import Path
from types import SimpleNamespace
import transport
from nvflare.client.config import ExchangeFormat
from nvflare.client.decomposers import register_framework_decomposers
from nvflare.fuel.utils import fobs
from nvflare.fuel.utils.fobs import FOBSContextKey, dots

folder = Path(sys.argv[1])
print("registered", transport.receive_to_disk(folder))
register_framework_decomposers(ExchangeFormat.PYTORCH, ExchangeFormat.PYTORCH, None)  # what flare.init does next
handler = fobs.get_dot_handler(dots.TENSOR_DOWNLOAD)
print("still ours", isinstance(handler, transport.DiskTensorDecomposer))

calls = []
transport.GroupedTensorDecomposer._download = lambda self, **kw: calls.append(kw)  # where the download would go
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


def test_a_site_writes_its_checkpoint_after_the_last_round_or_every_round_if_asked():
    sys.path.insert(0, str(ROOT))
    from client import checkpoint_due, parse_args

    assert parse_args([])[0].checkpoint == "last"
    assert [checkpoint_due("last", r, 3) for r in range(3)] == [False, False, True]
    assert [checkpoint_due("every", r, 3) for r in range(3)] == [True, True, True]
    assert checkpoint_due("last", 0, None)  # a server that does not say how many rounds: every round


def test_a_site_sends_its_weights_in_grouped_items(tmp_path):
    sys.path.insert(0, str(ROOT))
    import torch

    import transport

    weights = {f"T{i}": torch.zeros(1000 if i == 0 else 10) for i in range(20)}
    downloadable = transport.DiskTensorDecomposer(str(tmp_path)).to_downloadable(weights, 2 * 2**20, {})
    assert isinstance(downloadable, transport.GroupedTensorDownloadable) and downloadable.shared is None
    assert downloadable.get_item_count() == 2  # the 4,000-byte tensor, then the 19 small ones together


def test_the_builtin_trainer_gets_the_run_s_length_and_what_to_evaluate(tmp_path):
    """client.train_round passes the server's total_rounds on to the built-in trainer (its learning-rate schedule
    spans the run) and its val.json every round, with generation metrics every --eval_every rounds and in the last;
    nothing without a val.json or with --eval_every 0, and nothing to the official code's trainer."""
    from types import SimpleNamespace

    import client
    from local_trainer import TrainResult

    class Trainer:  # the trainers' interface, recording what it was given
        def __init__(self, val: str | None):
            self.calls, self.val = [], val

        def validation_file(self):
            return self.val

        def train_round(self, global_state, release_global_state=False, round_num=None, **options):
            self.calls.append({"round_num": round_num, **options})
            return TrainResult(update={}, metrics={"samples": 1.0})

    val = str(tmp_path / "val.json")
    evaluation = {"evaluate_on": val, "max_new_tokens": 32}

    def calls(kind: str, val: str | None, eval_every: int) -> list[dict]:
        trainer = Trainer(val)
        args = SimpleNamespace(
            trainer=kind, eval_every=eval_every, eval_samples=4, eval_max_new_tokens=32, eval_only=False
        )
        for round_num in range(4):
            _, result, error = client.train_round(trainer, HeldWeights(), None, round_num, 4, "test:", args, [])
            assert error is None and result.metrics["samples"] == 1.0
        return trainer.calls

    assert calls("builtin", val, 2) == [
        {"round_num": 0, "total_rounds": 4, **evaluation, "generate_samples": 4},
        {"round_num": 1, "total_rounds": 4, **evaluation, "generate_samples": 0},
        {"round_num": 2, "total_rounds": 4, **evaluation, "generate_samples": 4},
        {"round_num": 3, "total_rounds": 4, **evaluation, "generate_samples": 4},  # the last round
    ]
    assert (
        calls("builtin", val, 0) == calls("builtin", None, 1) == [{"round_num": r, "total_rounds": 4} for r in range(4)]
    )
    assert calls("qwen", val, 1) == [{"round_num": r} for r in range(4)]


def test_a_failed_round_is_reported_as_site_training_failed_with_the_trainer_kind(capsys):
    """A trainer that raises: the site reports `site training failed` naming the trainer kind, with a hint, and
    drops the trainer (a fresh one next round), unfreezing what `freeze_long_lived` froze so that it can be freed."""
    from types import SimpleNamespace

    import client

    class Broken:
        def validation_file(self):
            return None

        def train_round(self, *args, **kwargs):
            raise FileNotFoundError("data/site-1/train.json")

    args = SimpleNamespace(trainer="builtin", eval_every=0, eval_samples=0, eval_max_new_tokens=0, eval_only=False)
    gc.unfreeze()  # as a site process starts (an earlier test in this process may have frozen, bench_learning does)
    client.freeze_long_lived(None)
    assert gc.get_freeze_count() == 0  # nothing to freeze before a trainer exists
    client.freeze_long_lived(Broken())  # as after its first round
    assert gc.get_freeze_count() > 0
    trainer, result, error = client.train_round(
        Broken(), HeldWeights(), None, 0, 1, "test:", args, ["--dataset_use", "data/site-1"]
    )
    assert trainer is None and result is None and error.startswith("rank 0: FileNotFoundError")
    assert gc.get_freeze_count() == 0  # the frozen model of a failed trainer goes back to the collector
    out = capsys.readouterr()
    assert "site training failed (--trainer builtin): rank 0: FileNotFoundError: data/site-1/train.json" in out.err
    assert "test: sent weight 0 (after error) check data/site-1/train.json and --image_root" in out.out


def test_a_site_trains_from_the_tensors_it_holds_when_the_task_leaves_them_out(capsys):
    """A task that leaves out tensors (`transport.NOT_SENT`): the trainer is told to keep them when the site holds
    them as sent (received earlier, not trained since), and the round fails, dropping the trainer, when it does not;
    the result says whether the site keeps what it receives."""
    from types import SimpleNamespace

    import torch
    from nvflare.app_common.abstract.fl_model import FLModel, ParamsType

    import client
    from local_trainer import TrainResult

    class Trainer:
        keeps_unchanged = True

        def __init__(self):
            self.unchanged = []

        def validation_file(self):
            return None

        def train_round(self, global_state, release_global_state=False, round_num=None, unchanged=(), **options):
            self.unchanged.append(set(unchanged))
            return TrainResult(update={"lm.w": torch.zeros(2)}, metrics={"samples": 1.0})

    def task(names: list[str], left_out: list[str]) -> FLModel:
        params = {name: torch.ones(2) for name in names}
        return FLModel(params_type=ParamsType.FULL, params=params, meta={NOT_SENT: left_out} if left_out else {})

    args = SimpleNamespace(trainer="builtin", eval_every=0, eval_samples=0, eval_max_new_tokens=0, eval_only=False)
    trainer, held = Trainer(), HeldWeights()
    run = functools.partial(client.train_round, held=held, total_rounds=3, tag="test:", args=args, train_argv=[])
    trainer, result, error = run(trainer, global_model=task(["lm.w", "visual.w"], []), round_num=0)
    assert error is None and held.names == {"visual.w"}  # lm.w was trained: no longer as sent
    trainer, result, error = run(trainer, global_model=task(["lm.w"], ["visual.w"]), round_num=1)
    assert error is None and trainer.unchanged == [set(), {"visual.w"}]
    assert "received 1 tensors (0 on disk), 1 left out as this site holds them" in capsys.readouterr().out
    message = client.update_message(result, None, 0, keeps=trainer.keeps_unchanged)
    assert message.meta[KEEPS] is True

    trainer, result, error = run(trainer, global_model=task(["visual.w"], ["lm.w"]), round_num=2)
    assert trainer is None and "left out 1 tensors this site does not hold as sent (e.g. lm.w)" in error
    assert held.names == set()  # the next trainer is new: it holds nothing as sent
    assert KEEPS not in client.update_message(None, error, 0).meta
