"""LoRA (`--peft lora`, lora.py) on the tiny Qwen3-VL.

Three sites' rounds with the real trainer, averaged by the server's real aggregator: with `exact` (FFA-LoRA) the
global Delta W = alpha/r * B @ A is the sample-weighted average of the sites' Delta W to fp32 precision, sites of
different ranks included; with `naive` it measurably is not. Then the whole job through NVFlare's simulator and
torchrun: the loss falls, only B travels (fp32), the exported adapter and merged model load and agree, the adapter
runs in run_inference.py, and the job resumes from its `FL_global_model.pt`.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from nvflare.apis.fl_context import FLContext
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
from nvflare.app_common.abstract.model import make_model_learnable
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.app_event_type import AppEventType
from safetensors.torch import load_file

import lora
from fl_server import SampleWeightedFedAvg
from job import free_port_base
from local_trainer import LocalTrainer, TrainConfig
from model import Qwen3VLAdapter

ROOT = Path(__file__).resolve().parents[1]
SITE_SIZES = {"site-1": 16, "site-2": 8, "site-3": 8}


@pytest.fixture(scope="module")
def shards(tmp_path_factory, synthetic_pubmedvision) -> Path:
    """site-1..3 with 16, 8 and 8 records (unequal: a plain mean and a sample-weighted one differ)."""
    from prepare_data import add_image_placeholders
    from synthetic_data import JSON_NAME

    records = json.loads((synthetic_pubmedvision / JSON_NAME).read_text())
    data, start = tmp_path_factory.mktemp("lora_data"), 0
    for site, n in SITE_SIZES.items():
        (data / site).mkdir()
        (data / site / "train.json").write_text(
            json.dumps([add_image_placeholders(r) for r in records[start : start + n]])
        )
        start += n
    return data


def relative_error(got: dict, expected: dict) -> float:
    num = sum(float((got[k] - expected[k]).square().sum()) for k in expected)
    return (num / sum(float(v.square().sum()) for v in expected.values())) ** 0.5


def federated_round(aggregation, ranks, tiny_model_dir, shards, image_root, out: Path) -> dict:
    """One round of three sites (ranks per site) from the server's initial adapter, averaged by the aggregator."""
    settings = {"r": max(ranks), "aggregation": aggregation}
    initial = Qwen3VLAdapter(str(tiny_model_dir), settings).state_dict()
    fl_ctx = FLContext()
    held = {k: v.clone() for k, v in initial.items()}  # the aggregator adds to its global tensors in place
    fl_ctx.set_prop(AppConstants.GLOBAL_MODEL, make_model_learnable(held, {}), private=True, sticky=True)
    aggregator = SampleWeightedFedAvg(send_fp32=True)
    aggregator.handle_event(AppEventType.INITIAL_MODEL_LOADED, fl_ctx)
    sites = []
    for (site, _), rank in zip(SITE_SIZES.items(), ranks, strict=True):
        config = TrainConfig(
            model_name_or_path=str(tiny_model_dir), dataset_use=str(shards / site), image_root=str(image_root),
            output_dir=str(out / site), per_device_train_batch_size=4, gradient_accumulation_steps=1, bf16=False,
            torch_compile=False, learning_rate=2e-2, warmup_ratio=0.0, max_steps=3, peft="lora",
            lora_r=max(ranks), lora_trained_r=rank, lora_aggregation=aggregation, tune_mm_mlp=False,
        )  # fmt: skip
        trainer = LocalTrainer(config)
        result = trainer.train_round({k: v.clone() for k, v in initial.items()}, round_num=0, total_rounds=1)
        sites.append({"update": result.update, "samples": result.metrics["samples"], "local": trainer.state_dict()})
        meta = {"client_name": site}
        aggregator.accept_model(FLModel(ParamsType.DIFF, result.update, metrics=result.metrics, meta=meta))
        del trainer
    new = {k: v.clone() for k, v in aggregator.aggregate_model().params.items()}
    return {"initial": initial, "global": new, "sites": sites, "settings": lora.LoraSettings(**settings)}


def delta_w_check(run: dict) -> float:
    """Relative distance of the global Delta W from the sample-weighted average of the sites' Delta W."""
    settings, start = run["settings"], lora.delta_w(run["initial"], run["settings"])
    total = sum(s["samples"] for s in run["sites"])
    expected = {k: torch.zeros_like(v) for k, v in start.items()}
    for s in run["sites"]:
        for k, w in lora.delta_w(s["local"], settings).items():
            expected[k] += s["samples"] / total * (w - start[k])
    got = {k: w - start[k] for k, w in lora.delta_w(run["global"], settings).items()}
    return relative_error(got, expected)


def test_exact_aggregation_is_the_average_of_the_sites_delta_w_and_naive_is_not(
    tiny_model_dir, shards, synthetic_pubmedvision, tmp_path
):
    ranks = (2, 4, 4)  # heterogeneous: site-1 trains rank 2 of the global rank-4 adapter
    exact = federated_round("exact", ranks, tiny_model_dir, shards, synthetic_pubmedvision, tmp_path / "exact")
    # Only B travels, in fp32; the sites' A stayed the server's.
    for site in exact["sites"]:
        assert site["update"] and all(".lora_B." in k and v.dtype == torch.float32 for k, v in site["update"].items())
        for key, value in exact["initial"].items():
            if ".lora_A." in key:
                assert torch.equal(site["local"][key], value), key
    # The rank-2 site changed B's first 2 columns only: its Delta W has rank <= 2.
    low = exact["sites"][0]
    assert all(u[:, 2:].abs().max() == 0 and u[:, :2].abs().max() > 0 for u in low["update"].values())
    start = lora.delta_w(exact["initial"], exact["settings"])
    for key, w in lora.delta_w(low["local"], exact["settings"]).items():
        assert torch.linalg.matrix_rank(w - start[key]) <= 2, key
    exact_error = delta_w_check(exact)
    assert exact_error < 1e-5  # fp32 precision: the average of B times the shared A

    naive = federated_round("naive", ranks, tiny_model_dir, shards, synthetic_pubmedvision, tmp_path / "naive")
    assert any(".lora_A." in k for k in naive["sites"][1]["update"])
    naive_error = delta_w_check(naive)
    print(f"relative error of the global Delta W: exact {exact_error:.1e}, naive {naive_error:.1e}")
    assert naive_error > 1e-3  # avg(B) @ avg(A) is not avg(B @ A)


def test_a_compiled_decoder_layer_with_adapters_is_one_graph(tiny_model_dir):
    """PEFT's LoRA layers (dropout included) trace whole into each compiled decoder layer: no graph break, one graph, as
    `LocalTrainer` compiles it (after the adapters, dynamic shapes, bf16 autocast, forward and backward). The text path
    of the packed attention has no break on a GPU; here SDPA stands in for it (its CPU path splits at each sample)."""
    from torch._dynamo.utils import counters

    from model import load_hf_model

    model = load_hf_model(str(tiny_model_dir), dtype=torch.float32, attn_implementation="sdpa")
    settings = lora.LoraSettings(dropout=0.05)
    lora.add_adapters(model, settings)
    lora.set_trainable(model, settings)
    text = model.model.language_model
    layer = text.layers[1]
    layer.compile(dynamic=True)
    hidden = torch.randn(1, 12, model.config.text_config.hidden_size, requires_grad=True)
    position_ids = torch.arange(12).expand(3, 1, 12)
    torch._dynamo.reset()
    counters.clear()  # process-wide: other tests' compiles count there too
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(hidden, position_embeddings=text.rotary_emb(hidden, position_ids), attention_mask=None)
    out.float().sum().backward()
    assert dict(counters["graph_break"]) == {}
    assert counters["stats"]["unique_graphs"] == 1
    assert layer.self_attn.q_proj.lora_B.default.weight.grad.abs().sum() > 0


def test_lora_flags_are_checked():
    with pytest.raises(ValueError, match="lora_aggregation"):
        lora.LoraSettings(aggregation="svd")
    with pytest.raises(ValueError, match="trained rank"):
        lora.LoraSettings(r=8, trained_r=16)
    with pytest.raises(ValueError, match="fsdp"):
        TrainConfig(peft="lora", fsdp=True)
    assert lora.target_regex("q_proj,v_proj").startswith(r"model\.language_model\.")


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--peft", "lora", "--trainer", "qwen"], "built-in trainer only"),
        (["--peft", "lora", "--lora_r", "4,8"], "one per site"),
    ],
)
def test_unsupported_lora_flags_are_refused_by_job_py(flags, message, shards):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "job.py"), "--data_dir", str(shards), "--image_root", str(shards), *flags],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr[-2000:]


# ------------------------------------------------------------------------------------------- the job, end to end


def run_job(*args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "job.py"), *args], capture_output=True, text=True, timeout=600, cwd=ROOT
    )
    print(proc.stdout[-3000:], proc.stderr[-3000:])
    return proc


def job_args(tiny_model_dir, shards, image_root, workspace: Path, *more: str) -> list[str]:
    from job import DEMO_TRAIN_ARGS

    return [
        "--n_clients", "3", "--data_dir", str(shards), "--image_root", str(image_root),
        "--model_name_or_path", str(tiny_model_dir), "--learning_rate", "2e-2", "--workspace", str(workspace),
        "--master_port", str(free_port_base(3)), "--eval_every", "0", "--peft", "lora", "--lora_r", "4,8,8",
        f"--train_args={DEMO_TRAIN_ARGS} --save_sent", *more,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_model_dir, shards, synthetic_pubmedvision):
    workspace = tmp_path_factory.mktemp("lora_ws")
    proc = run_job(*job_args(tiny_model_dir, shards, synthetic_pubmedvision, workspace, "--num_rounds", "2"))
    return proc, workspace / "qwen3-vl"


def server_app(ws: Path) -> Path:
    return ws / "server" / "simulate_job" / "app_server"


@pytest.mark.slow
def test_lora_job_learns_and_sends_only_the_adapter_in_fp32(lora_run, tiny_model_dir):
    proc, ws = lora_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = json.loads((server_app(ws) / "site_metrics.json").read_text())
    final = torch.load(server_app(ws) / "FL_global_model.pt", weights_only=True)["model"]
    initial = Qwen3VLAdapter(str(tiny_model_dir), {"r": 8}).state_dict()
    assert final.keys() == initial.keys() and all(v.dtype == torch.float32 for v in final.values())
    b_bytes = sum(v.numel() * 4 for k, v in final.items() if ".lora_B." in k)
    for site in SITE_SIZES:
        got = {r["round"]: r for r in records if r["site"] == site}
        assert got[1]["loss"] < got[0]["loss"], (site, got)  # the loss falls
        assert got[0]["sent_bytes"] == got[1]["sent_bytes"] == b_bytes  # B only, fp32, reported per site and round
    assert f"sent {b_bytes / 1e6:.2f} MB" in proc.stdout
    # The global adapter: A as the server made it (frozen), B the initial plus each round's sample-weighted average
    # of what the sites sent (B only, fp32, zero beyond site-1's rank 4), to fp32 precision.
    expected = {k: v.double() for k, v in initial.items()}
    for rnd in (0, 1):
        sent = {s: site_dir(ws, s) / "sent" / f"round-{rnd}" for s in SITE_SIZES}
        weights = {s: json.loads(p.with_suffix(".json").read_text())["samples"] for s, p in sent.items()}
        for site, path in sent.items():
            update = load_file(path.with_suffix(".safetensors"))
            assert all(".lora_B." in k and v.dtype == torch.float32 for k, v in update.items())
            if site == "site-1":
                assert all(v[:, 4:].abs().max() == 0 for v in update.values())
            for key, value in update.items():
                expected[key] += weights[site] * value.double() / sum(weights.values())
    for key, value in final.items():  # fp32 precision (a bf16 rounding would be 4e-3 of the largest)
        assert (value.double() - expected[key]).abs().max() <= 1e-6 * expected[key].abs().max(), key
    assert any(not torch.equal(final[k], initial[k]) for k in final if ".lora_B." in k)
    # The updates stayed in the server's memory (no tensor disk offload for adapters); in round 1 the frozen A
    # matrices were left out of the sites' tasks, as the sites held them since round 0.
    server_log = (ws / "server" / "log.txt").read_text()
    assert server_log.count(f"site(s)' updates over {sum(weights.values()):g} samples to") == 2
    assert server_log.count("(0 read from disk in 0 files)") == 2
    assert "Memory cleanup" not in server_log  # nor NVFlare's per-round gc + malloc_trim, on the server or the sites
    a_tensors = sum(".lora_A." in k for k in final)
    for site in SITE_SIZES:
        site_log = (ws / site / "log.txt").read_text()
        assert f"round=1: received {len(final) - a_tensors} tensors" in site_log and "Memory cleanup" not in site_log
    # The full 2B model is 4.26 GB a round; the tiny model's B here is a few kB.
    full = sum(v.numel() * 2 for v in load_file(next(Path(tiny_model_dir).glob("*.safetensors"))).values())
    assert b_bytes < 0.01 * full


def site_dir(ws: Path, site: str) -> Path:
    return ws / site / "simulate_job" / f"app_{site}" / "qwen3vl_checkpoints"


@pytest.mark.slow
def test_exported_adapter_and_merged_model_load_and_give_the_same_logits(lora_run, tiny_model_dir):
    from peft import PeftModel
    from transformers import Qwen3VLForConditionalGeneration

    import run_inference
    from model import load_hf_model

    proc, ws = lora_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    adapter_dir, merged_dir = server_app(ws) / lora.ADAPTER_DIR_NAME, server_app(ws) / "hf_global_model"
    assert "global LoRA adapter (PEFT dir)" in proc.stdout
    final = torch.load(server_app(ws) / "FL_global_model.pt", weights_only=True)["model"]
    saved = load_file(adapter_dir / lora.ADAPTER_FILE)
    assert saved.keys() == final.keys() and all(torch.equal(saved[k], final[k]) for k in final)

    peft_model = PeftModel.from_pretrained(load_hf_model(str(tiny_model_dir), dtype=torch.float32), adapter_dir)
    merged = Qwen3VLForConditionalGeneration.from_pretrained(merged_dir, dtype=torch.bfloat16)
    exact = lora.load_merged(str(tiny_model_dir), adapter_dir, torch.float32)
    # hf_global_model is the base with the adapter merged in fp32, rounded to bf16
    rounded = exact.state_dict()
    assert all(torch.equal(v, rounded[k].to(torch.bfloat16)) for k, v in merged.state_dict().items())
    inference, _ = run_inference.load_model(str(adapter_dir), "unused", "cpu", torch.float32, 784, 50176)
    ids = torch.randint(0, 151643, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = peft_model.eval()(input_ids=ids).logits
        torch.testing.assert_close(exact.eval()(input_ids=ids).logits, logits, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(inference(input_ids=ids).logits, logits, rtol=1e-4, atol=1e-4)
        bf16 = merged.float().eval()(input_ids=ids).logits
    assert (bf16 - logits).abs().max() < 0.05 * logits.abs().max()  # the merged weights' bf16 rounding only
    base = load_hf_model(str(tiny_model_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        assert (base(input_ids=ids).logits - logits).abs().max() > 1e-3  # and the adapter changed the model


@pytest.mark.slow
def test_lora_job_resumes_from_its_global_adapter(lora_run, tiny_model_dir, shards, synthetic_pubmedvision, tmp_path):
    proc, ws = lora_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    checkpoint = tmp_path / "FL_global_model.pt"
    checkpoint.write_bytes((server_app(ws) / "FL_global_model.pt").read_bytes())
    more = ("--num_rounds", "1", "--resume_from", str(checkpoint))
    resumed = run_job(*job_args(tiny_model_dir, shards, synthetic_pubmedvision, tmp_path / "ws", *more))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resuming after round 1: rounds 2 to 2" in resumed.stdout
    records = json.loads((server_app(tmp_path / "ws" / "qwen3-vl") / "site_metrics.json").read_text())
    assert {r["round"] for r in records} == {2}
    first = {r["site"]: r["loss"] for r in json.loads((server_app(ws) / "site_metrics.json").read_text())
             if r["round"] == 1}  # fmt: skip
    assert all(r["loss"] < first[r["site"]] for r in records)  # it went on from the trained adapter
    # A whole model's checkpoint is not an adapter: refused up front
    import job

    with pytest.raises(SystemExit, match="add --peft lora"):
        job.resumed_round(str(checkpoint), "none")
