"""Split PubMedVision into one training file per federated site (plus an optional held-out test file).

Usage:
  python prepare_data.py                                   # 3 equal iid sites from the downloaded JSON
  python prepare_data.py --subset_size 5000 --test_size 1000
  python prepare_data.py --split dirichlet --alpha 0.5     # sites skewed by imaging modality
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import sys
from collections import Counter, defaultdict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tqdm import tqdm

DEFAULT_REPO_ID = "FreedomIntelligence/PubMedVision"
DEFAULT_DATA_FILE = "PubMedVision/PubMedVision_InstructionTuning_VQA.json"
IMAGE_TOKEN = "<image>"
MAX_LISTED = 5  # problems listed by id before "... and N more"
MAX_MIX = 7  # modalities named in a site's summary before "other"


class PrepareError(Exception):
    """A user-facing failure: printed as one clear message, exit code 1, nothing written."""


# ---------------------------------------------------------------- loading and validation


def load_records(path: Path) -> list:
    """The records of a JSON list file (or a JSON Lines file, one record a line)."""
    if not path.is_file():
        raise PrepareError(
            f"data file not found: {path}. Run download_data.py first, or pass --data_file '' to fetch it from the Hub."
        )
    print(f"Loading {path} ...")
    # Millions of new dicts and lists would trigger repeated full garbage collections (2-3x slower parsing);
    # parsed JSON has no reference cycles, so collection is paused while loading and the result is frozen after.
    gc.disable()
    try:
        with open(path, encoding="utf-8") as f:
            if path.suffix == ".jsonl":
                records = [json.loads(line) for line in f if line.strip()]
            else:
                records = json.load(f)
    except json.JSONDecodeError as e:
        where = f"line {e.lineno} column {e.colno}" if path.suffix != ".jsonl" else "one of its lines"
        raise PrepareError(f"{path} is not valid JSON ({e.msg} at {where}).") from e
    except UnicodeDecodeError as e:
        raise PrepareError(f"{path} is not UTF-8 text ({e}).") from e
    finally:
        gc.freeze()
        gc.enable()
    if not isinstance(records, list):
        raise PrepareError(f"{path} must hold a JSON list of records, found a JSON {type(records).__name__}.")
    return records


def record_images(record: dict) -> list:
    """The record's image paths as a list (PubMedVision stores a list; a single string is accepted too)."""
    images = record.get("image")
    return [images] if isinstance(images, str) else images


def _human_placeholder_count(conversations: list) -> int:
    return sum(turn["value"].count(IMAGE_TOKEN) for turn in conversations if turn["from"] == "human")


def record_problem(record: object) -> str | None:
    """Why a record cannot be used for training, or None when it is fine."""
    if not isinstance(record, dict):
        return f"is a {type(record).__name__}, not an object"
    images = record_images(record)
    if not images or not isinstance(images, list) or not all(isinstance(p, str) and p for p in images):
        return "has no 'image' (a non-empty list of image paths)"
    conversations = record.get("conversations")
    if not conversations or not isinstance(conversations, list):
        return "has no 'conversations' (a non-empty list of turns)"
    for turn in conversations:
        if (
            not isinstance(turn, dict)
            or not isinstance(turn.get("from"), str)
            or not isinstance(turn.get("value"), str)
        ):
            return "has a conversation turn without string 'from' and 'value'"
    if not any(turn["from"] == "human" for turn in conversations):
        return "has no human turn"
    found = _human_placeholder_count(conversations)
    if found not in (0, len(images)):
        return f"has {found} '{IMAGE_TOKEN}' placeholder(s) for {len(images)} image(s)"
    return None


def _describe(index: int, record: object) -> str:
    rid = record.get("id") if isinstance(record, dict) else None
    return f"record {index} (id {rid!r})"


def validate_records(records: list, source: str) -> None:
    """Raise naming the file and the first bad records (index and id) if any record is unusable."""
    bad = []
    for index, record in enumerate(records):
        problem = record_problem(record)
        if problem:
            bad.append(f"{_describe(index, record)} {problem}")
    if bad:
        listed = "\n  ".join(bad[:MAX_LISTED])
        more = f"\n  ... and {len(bad) - MAX_LISTED} more" if len(bad) > MAX_LISTED else ""
        raise PrepareError(f"{source}: {len(bad)} bad record(s):\n  {listed}{more}")


def add_image_placeholders(record: dict) -> dict:
    """Put one `<image>\\n` per image at the start of the first human turn, unless the record already has them.

    Qwen's training code pairs each `<image>` with one image, while PubMedVision's questions carry none.
    The record is changed in place (the loaded list is ours) to avoid copying 600k records.
    """
    images = record_images(record)
    conversations = record["conversations"]
    if _human_placeholder_count(conversations) == len(images):
        return record
    first_human = next(turn for turn in conversations if turn["from"] == "human")
    first_human["value"] = f"{IMAGE_TOKEN}\n" * len(images) + first_human["value"]
    return record


# ---------------------------------------------------------------- image checks


def _image_problem(path: Path) -> str | None:
    from PIL import Image

    if not path.is_file():
        return "missing"
    try:
        with Image.open(path) as image:
            image.verify()
    except Exception as e:  # PIL raises many types for broken files; any of them means unreadable
        return f"unreadable ({type(e).__name__})"
    return None


def find_bad_images(records: list, image_root: Path, workers: int = 8) -> list[tuple[int, str]]:
    """(record index, reason) for each record with a missing or unreadable image (PIL open + verify)."""
    jobs = [(i, image_root / p) for i, record in enumerate(records) for p in record_images(record)]
    bad: dict[int, str] = {}
    with ThreadPoolExecutor(workers) as pool:  # file I/O bound: threads overlap the disk waits
        results = pool.map(lambda job: _image_problem(job[1]), jobs, chunksize=64)
        for (index, path), problem in tqdm(zip(jobs, results, strict=True), total=len(jobs), desc="Checking images"):
            if problem and index not in bad:
                bad[index] = f"{path} {problem}"
    return sorted(bad.items())


def report_bad_images(records: list, bad: list[tuple[int, str]]) -> None:
    if not bad:
        print(f"All images of the {len(records):,} records are present and readable.")
        return
    print(f"{len(bad)} record(s) have missing or unreadable images.")
    for index, reason in bad[:MAX_LISTED]:
        print(f"  {_describe(index, records[index])}: {reason}")
    if len(bad) > MAX_LISTED:
        print(f"  ... and {len(bad) - MAX_LISTED} more")


# ---------------------------------------------------------------- splitting


def group_key(record: dict) -> str:
    """What makes hospitals differ: the imaging modality, else the body part."""
    return str(record.get("modality") or record.get("body_part") or "unknown")


def _dirichlet(alpha: float, k: int, rng: random.Random) -> list[float]:
    draws = [rng.gammavariate(alpha, 1.0) for _ in range(k)]
    total = sum(draws)
    # Tiny alphas can underflow every draw to 0: then the whole group goes to one random site.
    return [d / total for d in draws] if total > 0 else [float(i == rng.randrange(k)) for i in range(k)]


def _dirichlet_sites(
    pool: list[int], keys: Sequence[str], num_clients: int, alpha: float, rng: random.Random
) -> list[list[int]]:
    """Deal each group's records (in pool order) to the sites in shares drawn from Dirichlet(alpha)."""
    groups: dict[str, list[int]] = defaultdict(list)
    for index in pool:
        groups[keys[index]].append(index)
    sites: list[list[int]] = [[] for _ in range(num_clients)]
    for key in sorted(groups):
        members = groups[key]
        start, cumulative = 0, 0.0
        for site, share in enumerate(_dirichlet(alpha, num_clients, rng)):
            cumulative += share
            end = len(members) if site == num_clients - 1 else round(cumulative * len(members))
            sites[site].extend(members[start:end])
            start = end
    for site in sites:
        rng.shuffle(site)  # otherwise each file would be sorted by modality
    return sites


def split_indices(
    n: int,
    num_clients: int,
    seed: int = 0,
    test_size: int = 0,
    subset_size: int | None = None,
    split: str = "iid",
    alpha: float = 0.5,
    keys: Sequence[str] | None = None,
) -> tuple[list[list[int]], list[int]]:
    """Record indices of each site and of the test set: disjoint, shuffled with `seed`.

    iid: every site gets floor(remaining / num_clients) records (the remainder is dropped), or `subset_size`.
    dirichlet: per group key, site shares are drawn from Dirichlet(alpha); site sizes differ, `subset_size` caps them.
    The test set is an iid sample taken before the sites are formed.
    """
    if test_size >= n:
        raise PrepareError(f"--test_size {test_size} leaves nothing to train on: the data has {n} records.")
    rng = random.Random(seed)
    order = list(range(n))
    rng.shuffle(order)
    test, pool = order[:test_size], order[test_size:]
    per_site = len(pool) // num_clients
    if per_site == 0:
        raise PrepareError(
            f"too few records for {num_clients} sites: {len(pool)} left after the test set. "
            "Use fewer --num_clients, a smaller --test_size or more data."
        )
    if split == "iid":
        take = per_site if subset_size is None else subset_size
        if take > per_site:
            raise PrepareError(
                f"--subset_size {subset_size} is larger than each site's share: {len(pool)} records "
                f"(after {test_size} for test) give {per_site} per site for {num_clients} sites."
            )
        return [pool[i * per_site : i * per_site + take] for i in range(num_clients)], test

    if subset_size is not None and subset_size > len(pool):
        raise PrepareError(f"--subset_size {subset_size} is larger than the data: {len(pool)} records to split.")
    sites = _dirichlet_sites(pool, keys, num_clients, alpha, rng)
    for i, site in enumerate(sites):
        if not site:
            raise PrepareError(
                f"site-{i + 1} got no records at --alpha {alpha}; use a larger --alpha or another --seed."
            )
    if subset_size is not None:
        sites = [site[:subset_size] for site in sites]
    return sites, test


# ---------------------------------------------------------------- summary and writing


def summarize(name: str, records: list, keys: Sequence[str], indices: list[int]) -> str:
    """One line: record and image counts, then the modality mix in percent (the top MAX_MIX groups)."""
    mix = Counter(keys[i] for i in indices)
    images = sum(len(record_images(records[i])) for i in indices)
    top = mix.most_common(len(mix) if len(mix) <= MAX_MIX + 1 else MAX_MIX)
    parts = [f"{key} {100 * count / len(indices):.0f}%" for key, count in top]
    rest = len(indices) - sum(count for _, count in top)
    if rest:
        parts.append(f"other {100 * rest / len(indices):.0f}%")
    return f"  {name:<8} {len(indices):>9,} records {images:>9,} images | {', '.join(parts)}"


def write_json_list(path: Path, records: list, indices: list[int], bar: tqdm) -> Path:
    """Write the chosen records as one JSON list into a temp file next to `path`; return the temp path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    encode = json.JSONEncoder(ensure_ascii=False).encode  # per record: the C encoder, no giant string in memory
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write("[\n")
            for n, index in enumerate(indices):
                if n:
                    f.write(",\n")
                f.write(encode(add_image_placeholders(records[index])))
                if n % 10_000 == 0:
                    bar.update(min(10_000, len(indices) - n))
            f.write("\n]\n")
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def write_outputs(output_dir: Path, records: list, sites: list[list[int]], test: list[int]) -> list[Path]:
    """Write every file to a temp name first, then rename them all, so a failure leaves earlier outputs intact."""
    targets = [(output_dir / f"site-{i + 1}" / "train.json", site) for i, site in enumerate(sites)]
    if test:
        targets.append((output_dir / "test.json", test))
    temps: list[Path] = []
    try:
        with tqdm(total=sum(len(ix) for _, ix in targets), desc="Writing", unit=" records") as bar:
            for path, indices in targets:
                temps.append(write_json_list(path, records, indices, bar))
    except BaseException:
        for tmp in temps:
            tmp.unlink(missing_ok=True)
        raise
    for tmp, (path, _) in zip(temps, targets, strict=True):
        os.replace(tmp, path)
    stale_test = output_dir / "test.json"
    if not test and stale_test.exists():
        stale_test.unlink()  # an old test set may now overlap the new sites
        print(f"Removed {stale_test} left by an earlier run (no --test_size now; it could overlap the new sites).")
    written = {path for path, _ in targets}
    stale_sites = sorted(p.parent.name for p in output_dir.glob("site-*/train.json") if p not in written)
    if stale_sites:
        print(f"Note: {', '.join(stale_sites)} in {output_dir} are from an earlier run with more sites.")
    return [path for path, _ in targets]


# ---------------------------------------------------------------- CLI


def fetch_from_hub(repo_id: str, split_name: str) -> Path:
    """Download `<split_name>.json` of the dataset repo into the Hugging Face cache; return its path."""
    import huggingface_hub

    print(f"Downloading {split_name}.json of {repo_id} from the Hugging Face Hub ...")
    try:
        return Path(
            huggingface_hub.hf_hub_download(repo_id=repo_id, filename=f"{split_name}.json", repo_type="dataset")
        )
    except Exception as e:  # HTTP, offline, missing file: all mean the split could not be fetched
        raise PrepareError(f"could not download {split_name}.json from {repo_id}: {type(e).__name__}: {e}") from e


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=(
            "Split PubMedVision into <output_dir>/site-N/train.json (N = 1..num_clients) and, with --test_size, "
            "a held-out <output_dir>/test.json. Files keep the source's record format (a JSON list) with one "
            "'<image>\\n' per image added to the first human turn where missing. Sites are disjoint and shuffled "
            "with --seed. iid: equal sizes, floor(records / num_clients) each, the remainder is dropped. "
            "dirichlet: for each modality (else body_part) the site shares are drawn from Dirichlet(alpha), like "
            "hospitals with different equipment; site sizes then differ (not trimmed, as trimming to the smallest "
            "site would waste most data at small alpha) and --subset_size caps each site. All input is checked "
            "before anything is written; files are replaced atomically, and a test.json from an earlier run is "
            "removed when --test_size is 0 (it could overlap the new sites)."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--data_file", default=DEFAULT_DATA_FILE, help="local JSON list; '' fetches from the Hub")
    parser.add_argument("--split_name", default="PubMedVision_InstructionTuning_VQA", help="Hub file without .json")
    parser.add_argument("--repo_id", default=DEFAULT_REPO_ID, help="Hub dataset repo (with --data_file '')")
    parser.add_argument("--output_dir", default="./data", help="where site-N/train.json and test.json go")
    parser.add_argument("--num_clients", type=int, default=3, help="number of sites")
    parser.add_argument("--subset_size", type=int, default=None, help="at most this many records per site")
    parser.add_argument("--test_size", type=int, default=0, help="records held out in test.json, seen by no site")
    parser.add_argument("--seed", type=int, default=0, help="seed of the shuffle and the Dirichlet draws")
    parser.add_argument("--split", choices=("iid", "dirichlet"), default="iid", help="how records go to sites")
    parser.add_argument(
        "--alpha", type=float, default=0.5, help="with --split dirichlet: concentration, smaller = more skewed"
    )
    parser.add_argument("--check_images", action="store_true", help="open+verify every image of every record")
    parser.add_argument(
        "--image_root", default=None, help="folder image paths are relative to; unset: the data file's folder"
    )
    parser.add_argument("--drop_bad_images", action="store_true", help="with --check_images: drop bad records")
    return parser


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.num_clients < 1:
        parser.error(f"--num_clients must be at least 1, got {args.num_clients}")
    if args.subset_size is not None and args.subset_size < 1:
        parser.error(f"--subset_size must be at least 1, got {args.subset_size}")
    if args.test_size < 0:
        parser.error(f"--test_size must be 0 or more, got {args.test_size}")
    if args.alpha <= 0:
        parser.error(f"--alpha must be positive, got {args.alpha}")
    if args.drop_bad_images and not args.check_images:
        parser.error("--drop_bad_images needs --check_images")
    if args.check_images and not args.data_file.strip() and not args.image_root:
        parser.error("--check_images with --data_file '' needs --image_root (the Hub file comes without images)")


def run(args: argparse.Namespace) -> None:
    data_file = (
        Path(args.data_file.strip()) if args.data_file.strip() else fetch_from_hub(args.repo_id, args.split_name)
    )
    records = load_records(data_file)
    validate_records(records, str(data_file))
    if args.check_images:
        image_root = Path(args.image_root) if args.image_root else data_file.parent
        bad = find_bad_images(records, image_root)
        report_bad_images(records, bad)
        if bad and args.drop_bad_images:
            drop = {index for index, _ in bad}
            records = [record for i, record in enumerate(records) if i not in drop]
            print(f"Dropped {len(drop)} record(s); {len(records)} remain.")
    keys = [group_key(record) for record in records]
    sites, test = split_indices(
        len(records), args.num_clients, args.seed, args.test_size, args.subset_size, args.split, args.alpha, keys
    )
    print(f"Split {len(records):,} records ({args.split}, seed {args.seed}):")
    for i, site in enumerate(sites):
        print(summarize(f"site-{i + 1}", records, keys, site))
    if test:
        print(summarize("test", records, keys, test))
    paths = write_outputs(Path(args.output_dir), records, sites, test)
    print(f"Wrote {len(paths)} file(s) under {args.output_dir}.")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_args(parser, args)
    try:
        run(args)
    except PrepareError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
