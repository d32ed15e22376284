"""prepare_data.py: disjoint shuffled site shards, <image> placeholders, test split, Dirichlet skew, image checks,
and clear failures on bad input that leave earlier outputs intact."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections import Counter
from itertools import combinations
from pathlib import Path

import pytest

import prepare_data
from prepare_data import add_image_placeholders, split_indices
from synthetic_data import JSON_NAME, make_records, write_dataset

ROOT = Path(__file__).resolve().parents[1]


def run_prepare(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "prepare_data.py"), *args], capture_output=True, text=True, cwd=ROOT
    )


def load(path: Path) -> list[dict]:
    return json.loads(path.read_text())


def site_files(out: Path, n: int) -> list[list[dict]]:
    return [load(out / f"site-{i}" / "train.json") for i in range(1, n + 1)]


def val_files(out: Path, n: int) -> list[list[dict]]:
    return [load(out / f"site-{i}" / "val.json") for i in range(1, n + 1)]


def site_shards(out: Path, n: int) -> list[list[dict]]:
    """Each site's train.json and val.json records together."""
    return [train + val for train, val in zip(site_files(out, n), val_files(out, n), strict=True)]


def images(records: list[dict]) -> set[str]:
    return {path for record in records for path in record["image"]}


def ids(records: list[dict]) -> list[str]:
    return [r["id"] for r in records]


def write_records(path: Path, records: list) -> Path:
    path.write_text(json.dumps(records))
    return path


def without_placeholders(record: dict) -> dict:
    record = json.loads(json.dumps(record))
    for turn in record["conversations"]:
        turn["value"] = turn["value"].replace("<image>\n", "")
    return record


@pytest.fixture
def source(synthetic_pubmedvision) -> Path:
    return synthetic_pubmedvision / JSON_NAME


# ---------------------------------------------------------------- iid end to end


def test_iid_sites_are_equal_disjoint_shuffled_and_keep_the_records(source, tmp_path):
    out = tmp_path / "data"
    result = run_prepare("--data_file", str(source), "--output_dir", str(out), "--test_size", "10")
    assert result.returncode == 0, result.stderr
    original = load(source)  # 120 records: 10 for test, 110 // 3 = 36 per site, 2 dropped
    by_id = {r["id"]: r for r in original}
    sites, vals = site_files(out, 3), val_files(out, 3)
    test = load(out / "test.json")

    # each site's 36: ceil(5% of 36) = 2 in val.json (every record has its own images here), 34 in train.json
    assert [len(s) for s in sites] == [34, 34, 34] and [len(v) for v in vals] == [2, 2, 2] and len(test) == 10
    all_ids = [i for s in [*sites, *vals, test] for i in ids(s)]
    assert len(all_ids) == len(set(all_ids)) == 118
    assert set(all_ids) <= set(by_id)
    file_order = ids(original)
    for site in sites:
        assert ids(site) != sorted(ids(site), key=file_order.index)  # shuffled, not in file order
    assert ids(sites[0]) != file_order[:36]
    for record in [r for s in [*sites, *vals, test] for r in s]:
        assert without_placeholders(record) == by_id[record["id"]]  # nothing changed but the placeholders
    assert "site-1 train" in result.stdout and "34 records" in result.stdout and "test" in result.stdout
    assert "site-1 val" in result.stdout and "2 records" in result.stdout
    assert any(m in result.stdout for m in ("Computed Tomography", "X-Ray", "Ultrasound"))


def test_same_seed_same_split_other_seed_other_split(source, tmp_path):
    for name, seed in (("a", "0"), ("b", "0"), ("c", "1")):
        assert (
            run_prepare("--data_file", str(source), "--output_dir", str(tmp_path / name), "--seed", seed).returncode
            == 0
        )
    a, b, c = (ids(load(tmp_path / name / "site-1" / "train.json")) for name in "abc")
    assert a == b and a != c


def test_every_output_record_has_one_placeholder_per_image(source, tmp_path):
    out = tmp_path / "data"
    assert run_prepare("--data_file", str(source), "--output_dir", str(out)).returncode == 0
    records = [r for s in site_files(out, 3) for r in s]
    assert {len(r["image"]) for r in records} == {1, 2}  # both single and multi-image records were written
    for record in records:
        first_human = record["conversations"][0]["value"]
        n = len(record["image"])
        assert first_human.startswith("<image>\n" * n) and first_human.count("<image>") == n


def test_subset_size_caps_each_site(source, tmp_path):
    out = tmp_path / "data"
    assert run_prepare("--data_file", str(source), "--output_dir", str(out), "--subset_size", "5").returncode == 0
    sites = site_shards(out, 3)  # train + val: ceil(5% of 5) = 1 in val
    assert [len(s) for s in sites] == [5, 5, 5] and [len(v) for v in val_files(out, 3)] == [1, 1, 1]
    assert len({i for s in sites for i in ids(s)}) == 15


# ---------------------------------------------------------------- placeholders (unit)


def _record(images, *human_values: str) -> dict:
    turns = []
    for value in human_values:
        turns += [{"from": "human", "value": value}, {"from": "gpt", "value": "answer"}]
    return {"id": "r", "image": images, "conversations": turns}


@pytest.mark.parametrize(
    ("record", "expected_first", "expected_second"),
    [
        (_record(["a.jpg"], "Q?"), "<image>\nQ?", None),
        (_record(["a.jpg", "b.jpg"], "Q?"), "<image>\n<image>\nQ?", None),
        (_record("a.jpg", "Q?"), "<image>\nQ?", None),  # a single path as a string
        (_record(["a.jpg"], "<image>\nQ?"), "<image>\nQ?", None),  # already there: untouched
        (_record(["a.jpg", "b.jpg"], "Compare <image> with <image>."), "Compare <image> with <image>.", None),
        (_record(["a.jpg"], "Q1?", "Q2?"), "<image>\nQ1?", "Q2?"),  # only the first human turn
        (_record(["a.jpg", "b.jpg"], "<image>\nQ1?", "<image>\nQ2?"), "<image>\nQ1?", "<image>\nQ2?"),
    ],
)
def test_add_image_placeholders(record, expected_first, expected_second):
    out = add_image_placeholders(record)
    assert out["conversations"][0]["value"] == expected_first
    if expected_second is not None:
        assert out["conversations"][2]["value"] == expected_second
    assert [t["value"] for t in out["conversations"][1::2]] == ["answer"] * (len(out["conversations"]) // 2)


# ---------------------------------------------------------------- test split and Dirichlet


def _mean_pairwise_tv(sites: list[list[dict]]) -> float:
    """Mean total-variation distance between the sites' modality distributions."""
    dists = []
    for site in sites:
        counts = Counter(r["modality"] for r in site)
        dists.append({k: v / len(site) for k, v in counts.items()})
    keys = {k for d in dists for k in d}
    pairs = list(combinations(dists, 2))
    return sum(0.5 * sum(abs(a.get(k, 0) - b.get(k, 0)) for k in keys) for a, b in pairs) / len(pairs)


@pytest.fixture(scope="module")
def records_3000(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("big") / "records.json"
    return write_records(path, [record for record, _ in make_records(3000, seed=3)])


def test_dirichlet_skews_modalities_far_more_than_iid(records_3000, tmp_path):
    common = ("--data_file", str(records_3000), "--test_size", "300")
    assert run_prepare(*common, "--output_dir", str(tmp_path / "iid")).returncode == 0
    result = run_prepare(*common, "--output_dir", str(tmp_path / "dir"), "--split", "dirichlet", "--alpha", "0.1")
    assert result.returncode == 0, result.stderr
    iid, skewed = site_shards(tmp_path / "iid", 3), site_shards(tmp_path / "dir", 3)

    tv_iid, tv_skewed = _mean_pairwise_tv(iid), _mean_pairwise_tv(skewed)
    assert tv_iid < 0.1
    assert tv_skewed > 0.4 and tv_skewed > 4 * tv_iid
    test = ids(load(tmp_path / "dir" / "test.json"))
    site_ids = [i for s in skewed for i in ids(s)]
    assert len(site_ids) == len(set(site_ids)) == 2700  # dirichlet keeps every non-test record
    assert not set(test) & set(site_ids) and len(test) == 300
    assert "Ultrasound" in result.stdout  # the summary names the modality mix
    mixed = [[r["modality"] for r in site] for site in skewed if len({r["modality"] for r in site}) > 1]
    assert mixed and all(order != sorted(order) for order in mixed)  # shuffled, not grouped by modality


def test_dirichlet_subset_caps_sites_and_falls_back_to_body_part():
    parts = ("Chest", "Brain", "Knee", "Skin")
    keys = [prepare_data.group_key({"body_part": parts[i % 4]}) for i in range(400)]  # no modality field
    common = {"n": 400, "num_clients": 3, "seed": 0, "test_size": 20, "keys": keys}
    sites, test = split_indices(**common, subset_size=60, split="dirichlet", alpha=0.1)
    iid_sites, _ = split_indices(**common, split="iid")
    assert all(0 < len(s) <= 60 for s in sites)
    used = [i for s in [*sites, test] for i in s]
    assert len(used) == len(set(used))

    def purity(site: list[int]) -> float:  # share of the site's most common body part
        return max(Counter(keys[i] for i in site).values()) / len(site)

    assert sum(map(purity, iid_sites)) / 3 < 0.4 < 0.6 < sum(map(purity, sites)) / 3


def test_dirichlet_site_left_empty_is_an_error():
    with pytest.raises(prepare_data.PrepareError, match="got no records at --alpha 0.01"):
        split_indices(100, 3, seed=0, split="dirichlet", alpha=0.01, keys=["one group"] * 100)


def test_iid_split_indices_are_disjoint_and_drop_only_the_remainder():
    sites, test = split_indices(103, 4, seed=7, test_size=5)  # 98 left: 24 per site, 2 dropped
    assert [len(s) for s in sites] == [24] * 4 and len(test) == 5
    used = [i for s in [*sites, test] for i in s]
    assert len(used) == len(set(used)) == 101 and set(used) <= set(range(103))


# ---------------------------------------------------------------- image groups and val.json


def _qa(record_id: str, image_paths: list[str], question: str) -> dict:
    turns = [{"from": "human", "value": question}, {"from": "gpt", "value": "An answer."}]
    return {"id": record_id, "image": image_paths, "conversations": turns, "modality": "X-Ray"}


def test_image_groups_join_records_sharing_an_image_transitively():
    records = [
        _qa("ins-0", ["images/a.jpg"], "Q"),
        _qa("ins-1", ["images/b.jpg"], "Q"),
        _qa("aln-0", ["./images/a.jpg"], "Q"),  # the Alignment file's record on ins-0's image (path spelt otherwise)
        _qa("ins-2", ["images/c.jpg"], "Q"),
        _qa("multi", ["images/b.jpg", "images/c.jpg"], "Q"),  # chains ins-1 and ins-2 into one group
        _qa("ins-3", ["images/d.jpg"], "Q"),
    ]
    assert prepare_data.image_groups(records) == [0, 1, 0, 1, 1, 2]


def test_split_keeps_groups_whole_and_val_takes_whole_groups():
    groups = [i // 3 for i in range(300)]  # 100 groups of 3 records
    for split in ("iid", "dirichlet"):
        keys = ["CT" if g % 2 else "MR" for g in groups]
        sites, test = split_indices(300, 3, seed=1, test_size=30, split=split, keys=keys, groups=groups)
        assert len(test) == 30 and all(len(s) > 0 for s in sites)
        sides = [test, *sites]
        for a, b in combinations(sides, 2):
            assert not {groups[i] for i in a} & {groups[i] for i in b}
        train, val = prepare_data.split_validation(sites[0], groups, 5, "site-1")
        assert len(val) == 6 and sorted(train + val) == sorted(sites[0])  # two whole groups reach 5 records
        assert not {groups[i] for i in train} & {groups[i] for i in val}


def test_default_val_size_is_five_percent_capped():
    assert [prepare_data.default_val_size(n) for n in (1, 20, 21, 36, 4000, 10**6)] == [1, 1, 2, 2, 200, 200]


@pytest.fixture
def two_files_sharing_images(tmp_path) -> tuple[Path, Path]:
    """An InstructionTuning-like file of 200 records, and an Alignment-like file on the same images, with
    multi-image records that chain two InstructionTuning records' images."""
    instruction = [record for record, _ in make_records(200, seed=5, multi_image_fraction=0.2)]
    alignment = [_qa(f"aln-{i}", r["image"][:1], "Describe the image.") for i, r in enumerate(instruction)]
    alignment += [
        _qa(f"chain-{i}", [instruction[i]["image"][0], instruction[i + 1]["image"][-1]], "Compare them.")
        for i in range(0, 200, 7)
    ]
    return (
        write_records(tmp_path / "PubMedVision_InstructionTuning_VQA.json", instruction),
        write_records(tmp_path / "PubMedVision_Alignment_VQA.json", alignment),
    )


@pytest.mark.parametrize("split", ["iid", "dirichlet"])
def test_no_image_straddles_test_train_and_val_across_two_files(two_files_sharing_images, tmp_path, split):
    instruction, alignment = two_files_sharing_images
    out = tmp_path / "data"
    data_file = f"{instruction},{alignment}"
    result = run_prepare("--data_file", data_file, "--output_dir", str(out), "--test_size", "40", "--split", split)
    assert result.returncode == 0, result.stderr
    sides = {"test": load(out / "test.json")}
    for i in range(1, 4):
        sides[f"site-{i} train"] = load(out / f"site-{i}" / "train.json")
        sides[f"site-{i} val"] = load(out / f"site-{i}" / "val.json")
    for (a, ra), (b, rb) in combinations(sides.items(), 2):
        assert not images(ra) & images(rb), f"{a} and {b} share images"
    used = [i for records in sides.values() for i in ids(records)]
    assert len(used) == len(set(used))
    assert any(i.startswith("aln-") for i in used) and any(i.startswith("chain-") for i in used)
    assert len(sides["test"]) >= 40
    for name, records in sides.items():  # the script says how many records and images each side has
        assert re.search(rf"{name}\s+{len(records)} records\s+{len(images(records))} images", result.stdout), name


def test_val_size_sets_records_per_site_and_zero_removes_stale_val_files(source, tmp_path):
    out = tmp_path / "data"
    assert run_prepare("--data_file", str(source), "--output_dir", str(out), "--val_size", "7").returncode == 0
    assert [len(v) for v in val_files(out, 3)] == [7, 7, 7] and [len(s) for s in site_files(out, 3)] == [33] * 3
    result = run_prepare("--data_file", str(source), "--output_dir", str(out), "--val_size", "0")
    assert result.returncode == 0, result.stderr
    assert not list(out.glob("site-*/val.json")) and "Removed" in result.stdout
    assert [len(s) for s in site_files(out, 3)] == [40, 40, 40]


# ---------------------------------------------------------------- image checks


@pytest.fixture
def dataset_with_bad_images(tmp_path) -> Path:
    root = tmp_path / "ds"
    json_path = write_dataset(root, num_records=30, seed=4, multi_image_fraction=0.0)
    records = load(json_path)
    (root / records[3]["image"][0]).unlink()
    (root / records[11]["image"][0]).write_bytes(b"not a jpeg at all")
    return json_path


def test_check_images_reports_missing_and_unreadable(dataset_with_bad_images, tmp_path):
    out = tmp_path / "data"
    result = run_prepare("--data_file", str(dataset_with_bad_images), "--output_dir", str(out), "--check_images")
    assert result.returncode == 0, result.stderr
    assert "2 record(s) have missing or unreadable images" in result.stdout
    assert "record 3 (id 'syn-0000003')" in result.stdout and "missing" in result.stdout
    assert "record 11 (id 'syn-0000011')" in result.stdout and "unreadable" in result.stdout
    assert sum(len(s) for s in site_shards(out, 3)) == 30  # reported, not dropped


def test_drop_bad_images_removes_them_before_splitting(dataset_with_bad_images, tmp_path):
    out = tmp_path / "data"
    image_root = dataset_with_bad_images.parent
    result = run_prepare(
        "--data_file", str(dataset_with_bad_images), "--output_dir", str(out), "--check_images", "--drop_bad_images",
        "--image_root", str(image_root),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    kept = [i for s in site_shards(out, 3) for i in ids(s)]
    assert len(kept) == 27 and not {"syn-0000003", "syn-0000011"} & set(kept)  # 28 good // 3 sites = 9 each


@pytest.mark.parametrize("drop", [[], ["--drop_bad_images"]])
def test_check_images_with_every_image_missing_writes_nothing_and_fails(drop, tmp_path):
    """A wrong --image_root: every record is bad, so no shard (empty or unchecked) is written, earlier ones stay."""
    json_path = write_dataset(tmp_path / "ds", num_records=12, seed=1)
    out = tmp_path / "data"
    (out / "site-1").mkdir(parents=True)
    (out / "site-1" / "train.json").write_text("[]")  # an earlier run's shard
    result = run_prepare(
        "--data_file", str(json_path), "--output_dir", str(out), "--check_images", *drop,
        "--image_root", str(tmp_path / "elsewhere"),
    )  # fmt: skip
    assert result.returncode == 1
    assert "every one of the 12 records has a missing or unreadable image" in result.stderr
    assert "--image_root" in result.stderr
    assert [p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()] == ["site-1/train.json"]
    assert (out / "site-1" / "train.json").read_text() == "[]"


# ---------------------------------------------------------------- Hub path


def test_empty_data_file_downloads_the_split_from_the_hub(source, tmp_path, monkeypatch):
    """The Hub is unreachable here: a stand-in for hf_hub_download returns a local copy, as the real one would."""
    import huggingface_hub

    calls = []

    def fake_hf_hub_download(**kwargs):
        calls.append(kwargs)
        return str(source)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_hf_hub_download)
    out = tmp_path / "data"
    assert (
        prepare_data.main(["--data_file", "", "--split_name", "PubMedVision_Alignment_VQA", "--output_dir", str(out)])
        == 0
    )
    assert calls == [
        {
            "repo_id": "FreedomIntelligence/PubMedVision",
            "filename": "PubMedVision_Alignment_VQA.json",
            "repo_type": "dataset",
        }
    ]
    assert [len(s) for s in site_shards(out, 3)] == [40, 40, 40]


# ---------------------------------------------------------------- bad input


@pytest.fixture
def earlier_outputs(source, tmp_path) -> tuple[Path, dict[Path, bytes]]:
    """An output folder from a successful earlier run, and its files' bytes."""
    out = tmp_path / "data"
    assert run_prepare("--data_file", str(source), "--output_dir", str(out), "--test_size", "6").returncode == 0
    return out, {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}


def _bad_record_file(tmp_path: Path, source: Path, index: int, change) -> Path:
    records = load(source)
    change(records[index])
    return write_records(tmp_path / "bad.json", records)


def _mismatched_placeholders(record: dict) -> None:
    record["image"] = ["a.jpg", "b.jpg"]
    record["conversations"][0]["value"] = "<image>\n" + record["conversations"][0]["value"]


def _text(text: str):
    def make(tmp: Path, src: Path) -> Path:
        (tmp / "bad.json").write_text(text)
        return tmp / "bad.json"

    return make


def _changed(index: int, change):
    return lambda tmp, src: _bad_record_file(tmp, src, index, change)


def _source(tmp: Path, src: Path) -> Path:
    return src


def _absent(tmp: Path, src: Path) -> Path:
    return tmp / "absent.json"


# case: (make the data file, extra arguments, texts the error must contain)
BAD_INPUTS = {
    "malformed json": (_text('[{"id": "x",\n'), [], ["bad.json", "not valid JSON", "line 2"]),
    "not a list": (_text('{"id": 1}'), [], ["bad.json", "JSON list"]),
    "missing file": (_absent, [], ["absent.json", "not found", "download_data.py"]),
    "no image": (_changed(7, lambda r: r.pop("image")), [], ["bad.json", "record 7 (id 'syn-0000007')", "'image'"]),
    "no conversations": (
        _changed(3, lambda r: r.pop("conversations")),
        [],
        ["record 3 (id 'syn-0000003')", "'conversations'"],
    ),
    "placeholder mismatch": (
        _changed(5, _mismatched_placeholders),
        [],
        ["record 5 (id 'syn-0000005')", "1 '<image>' placeholder(s) for 2 image(s)"],
    ),
    "subset too large": (_source, ["--subset_size", "41"], ["--subset_size 41", "40 per site"]),
    "subset larger than data": (_source, ["--subset_size", "500", "--split", "dirichlet"], ["larger than the data"]),
    "too few records": (_source, ["--num_clients", "121"], ["too few records", "121 sites"]),
    "test takes all": (_source, ["--test_size", "120"], ["--test_size 120", "120 records"]),
    "val takes all": (_source, ["--val_size", "40"], ["--val_size", "site-1 nothing to train on", "40 records"]),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_fails_clearly_and_keeps_earlier_outputs(case, source, tmp_path, earlier_outputs):
    make, extra, messages = BAD_INPUTS[case]
    data_file = make(tmp_path, source)
    out, before = earlier_outputs
    result = run_prepare("--data_file", str(data_file), "--output_dir", str(out), *extra)
    assert result.returncode == 1
    for message in messages:
        assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--num_clients", "0"], "--num_clients must be at least 1"),
        (["--subset_size", "0"], "--subset_size must be at least 1"),
        (["--test_size", "-1"], "--test_size must be 0 or more"),
        (["--val_size", "-1"], "--val_size must be 0 or more"),
        (["--alpha", "0"], "--alpha must be positive"),
        (["--drop_bad_images"], "--drop_bad_images needs --check_images"),
    ],
)
def test_bad_arguments_are_usage_errors(args, message, source, tmp_path):
    result = run_prepare("--data_file", str(source), "--output_dir", str(tmp_path / "o"), *args)
    assert result.returncode == 2 and message in result.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("flag", ["--num_client", "--test", "--check_image"])
def test_a_mistyped_or_shortened_flag_is_refused(flag, source, tmp_path):
    result = run_prepare("--data_file", str(source), "--output_dir", str(tmp_path / "o"), flag, "2")
    assert result.returncode == 2 and f"unrecognized arguments: {flag}" in result.stderr
    assert not (tmp_path / "o").exists()


def test_failure_while_writing_leaves_earlier_outputs_and_no_temp_files(source, earlier_outputs, monkeypatch):
    out, before = earlier_outputs
    real = prepare_data.add_image_placeholders
    calls = []

    def fail_late(record):
        calls.append(1)
        if len(calls) == 70:  # in site-2's file, after site-1's was fully written
            raise OSError("No space left on device")
        return real(record)

    monkeypatch.setattr(prepare_data, "add_image_placeholders", fail_late)
    with pytest.raises(OSError, match="No space left"):
        prepare_data.main(["--data_file", str(source), "--output_dir", str(out), "--seed", "9"])
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_help_documents_defaults_and_dirichlet_sizes():
    result = run_prepare("--help")
    text = " ".join(result.stdout.split())
    assert result.returncode == 0
    for expected in ("(default: ./data)", "(default: 3)", "(default: iid)", "site sizes then differ", "--test_size"):
        assert expected in text
    for expected in ("site-N/val.json", "0: no val.json", "5% of the shard, rounded up, at most 200", "image group"):
        assert expected in text


def test_jsonl_input_is_accepted(source, tmp_path):
    jsonl = tmp_path / "records.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in load(source)) + "\n")
    out = tmp_path / "data"
    assert run_prepare("--data_file", str(jsonl), "--output_dir", str(out), "--num_clients", "2").returncode == 0
    assert [len(s) for s in site_shards(out, 2)] == [60, 60]


def test_rerun_without_test_size_removes_the_stale_test_file(source, earlier_outputs):
    out, before = earlier_outputs
    assert out / "test.json" in before
    result = run_prepare("--data_file", str(source), "--output_dir", str(out), "--seed", "5")
    assert result.returncode == 0, result.stderr
    assert not (out / "test.json").exists() and "Removed" in result.stdout


def test_check_images_refuses_paths_outside_the_image_root(tmp_path):
    """An image path that climbs out of --image_root (or is absolute) is reported as refused and never opened, even
    when a file is there."""
    from PIL import Image

    from prepare_data import find_bad_images

    (tmp_path / "root" / "images").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "root" / "images" / "ok.jpg")
    Image.new("RGB", (8, 8)).save(tmp_path / "outside.jpg")
    records = [{"id": n, "image": [p]} for n, p in
               [("ok", "images/ok.jpg"), ("up", "../outside.jpg"), ("abs", str(tmp_path / "outside.jpg"))]]  # fmt: skip
    bad = dict(find_bad_images(records, tmp_path / "root", workers=2))
    assert sorted(bad) == [1, 2] and all("refused" in reason for reason in bad.values())
