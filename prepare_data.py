"""Split PubMedVision into one training file per federated site (plus an optional held-out test file).

Usage:
  python prepare_data.py                                   # 3 equal iid sites from the downloaded JSON
  python prepare_data.py --subset_size 5000 --test_size 1000
  python prepare_data.py --split dirichlet --alpha 0.5     # sites skewed by imaging modality
"""

from __future__ import annotations

import argparse
import bisect
import gc
import json
import math
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
DEFAULT_VAL_SHARE = 0.05  # of a site's shard held out in val.json by default ...
DEFAULT_VAL_MAX = 200  # ... but at most this many records


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


def _image_problem(path: Path | str, image_root: Path) -> str | None:
    from PIL import Image

    if isinstance(path, str):  # as written in the record: it was refused
        return f"is not a path inside --image_root {image_root} (refused)"
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
    from local_trainer import resolve_image  # the trainer's rule: relative paths that stay inside the root

    jobs = []
    for i, record in enumerate(records):
        for p in record_images(record):
            try:
                jobs.append((i, resolve_image(image_root, p, record.get("id"))))
            except ValueError:  # absolute, or leaving the root: refused, never opened
                jobs.append((i, p))
    bad: dict[int, str] = {}
    with ThreadPoolExecutor(workers) as pool:  # file I/O bound: threads overlap the disk waits
        results = pool.map(lambda job: _image_problem(job[1], image_root), jobs, chunksize=64)
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


def image_groups(records: Sequence[dict]) -> list[int]:
    """Each record's image group: records that share an image path, directly or through others, share a group.

    PubMedVision's Alignment and InstructionTuning files ask about the same images, and a multi-image record can
    link several groups: whole groups go to one side (test, a site's train or val), so no side sees another's image.
    Groups are numbered 0, 1, ... in the order of their first record.
    """
    parent = list(range(len(records)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]  # path halving keeps the trees flat
            i = parent[i]
        return i

    first_with: dict[str, int] = {}
    for index, record in enumerate(records):
        for path in record_images(record):
            other = first_with.setdefault(os.path.normpath(path), index)
            a, b = root(index), root(other)
            if a != b:
                parent[max(a, b)] = min(a, b)  # the root stays the group's first record
    numbers: dict[int, int] = {}
    return [numbers.setdefault(root(i), len(numbers)) for i in range(len(records))]


def _members(groups: Sequence[int]) -> list[list[int]]:
    """Record indices of each group (group ids are 0..G-1)."""
    members: list[list[int]] = [[] for _ in range(max(groups, default=-1) + 1)]
    for index, group in enumerate(groups):
        members[group].append(index)
    return members


def _dirichlet(alpha: float, k: int, rng: random.Random) -> list[float]:
    draws = [rng.gammavariate(alpha, 1.0) for _ in range(k)]
    total = sum(draws)
    # Tiny alphas can underflow every draw to 0: then the whole group goes to one random site.
    return [d / total for d in draws] if total > 0 else [float(i == rng.randrange(k)) for i in range(k)]


def _dirichlet_sites(
    pool: list[int], members: list[list[int]], keys: Sequence[str], num_clients: int, alpha: float, rng: random.Random
) -> list[list[int]]:
    """Per key (of a group's first record), deal the image groups (in pool order) to the sites in record shares
    drawn from Dirichlet(alpha): a group goes to the site whose share covers the group's first record."""
    by_key: dict[str, list[int]] = defaultdict(list)
    for group in pool:
        by_key[keys[members[group][0]]].append(group)
    sites: list[list[int]] = [[] for _ in range(num_clients)]
    for key in sorted(by_key):
        total = sum(len(members[g]) for g in by_key[key])
        bounds, cumulative = [], 0.0
        for share in _dirichlet(alpha, num_clients, rng):
            cumulative += share
            bounds.append(round(cumulative * total))
        bounds[-1] = total
        offset = 0
        for group in by_key[key]:
            sites[bisect.bisect_right(bounds, offset)].extend(members[group])
            offset += len(members[group])
    return sites


def _iid_sites(pool: list[int], members: list[list[int]], num_clients: int) -> list[list[int]]:
    """Deal the image groups (in pool order) one by one to the site with the fewest records so far."""
    sites: list[list[int]] = [[] for _ in range(num_clients)]
    for group in pool:
        min(sites, key=len).extend(members[group])
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
    groups: Sequence[int] | None = None,
) -> tuple[list[list[int]], list[int]]:
    """Record indices of each site and of the test set: disjoint by image group, shuffled with `seed`.

    `groups` is each record's image group (`image_groups`); None: every record is its own group. Whole groups go
    to the test set or to one site, so record counts are met to within a group's size.
    iid: groups are dealt to the least-filled site, then every site is cut to the smallest one (at most
    floor(remaining / num_clients) records), or to `subset_size`.
    dirichlet: per group key, site shares are drawn from Dirichlet(alpha); site sizes differ, `subset_size` caps them.
    The test set is an iid sample of groups taken before the sites are formed, until it holds `test_size` records.
    """
    if test_size >= n:
        raise PrepareError(f"--test_size {test_size} leaves nothing to train on: the data has {n} records.")
    members = _members(range(n) if groups is None else groups)
    rng = random.Random(seed)
    order = list(range(len(members)))
    rng.shuffle(order)
    test: list[int] = []
    taken = 0
    while len(test) < test_size:
        test += members[order[taken]]
        taken += 1
    pool = order[taken:]
    remaining = n - len(test)
    if not pool:
        raise PrepareError(f"--test_size {test_size} takes every image group: use a smaller --test_size.")
    per_site = remaining // num_clients
    if per_site == 0:
        raise PrepareError(
            f"too few records for {num_clients} sites: {remaining} left after the test set. "
            "Use fewer --num_clients, a smaller --test_size or more data."
        )
    if split == "iid":
        take = per_site if subset_size is None else subset_size
        if take > per_site:
            raise PrepareError(
                f"--subset_size {subset_size} is larger than each site's share: {remaining} records "
                f"(after {len(test)} for test) give {per_site} per site for {num_clients} sites."
            )
        sites = _iid_sites(pool, members, num_clients)
        take = min(take, *map(len, sites))
    else:
        if subset_size is not None and subset_size > remaining:
            raise PrepareError(f"--subset_size {subset_size} is larger than the data: {remaining} records to split.")
        sites = _dirichlet_sites(pool, members, keys, num_clients, alpha, rng)
        for i, site in enumerate(sites):
            if not site:
                raise PrepareError(
                    f"site-{i + 1} got no records at --alpha {alpha}; use a larger --alpha or another --seed."
                )
        take = subset_size
    for site in sites:
        rng.shuffle(site)  # otherwise each file would be sorted by group (and, for dirichlet, by modality)
    return [site[:take] for site in sites], test


def default_val_size(site_records: int) -> int:
    """Records a site holds out for validation by default: 5% of its shard, rounded up, at most 200."""
    return min(DEFAULT_VAL_MAX, math.ceil(site_records * DEFAULT_VAL_SHARE))


def split_validation(
    site: list[int], groups: Sequence[int] | None, val_size: int | None, name: str
) -> tuple[list[int], list[int]]:
    """(train, val) record indices of one site: whole image groups, in the site's (shuffled) order, go to val until
    it holds `val_size` records (None: `default_val_size`; 0: no val); at least one group stays for training."""
    target = default_val_size(len(site)) if val_size is None else val_size
    if target == 0:
        return site, []
    if target >= len(site):
        raise PrepareError(
            f"a validation set of {target} records (--val_size) leaves {name} nothing to train on: it has "
            f"{len(site)} records. Use a smaller --val_size, or 0 for none."
        )
    group_of = (lambda i: i) if groups is None else groups.__getitem__
    sizes = Counter(group_of(i) for i in site)
    if len(sizes) == 1:
        raise PrepareError(
            f"{name} holds a single image group ({len(site)} records), so it cannot be split into train and val "
            "without sharing images. Use --val_size 0, or more data per site."
        )
    val_groups: set[int] = set()
    in_val = 0
    for index in site:
        group = group_of(index)
        if in_val >= target:
            break
        if group in val_groups or len(val_groups) == len(sizes) - 1:
            continue
        val_groups.add(group)
        in_val += sizes[group]
    return [i for i in site if group_of(i) not in val_groups], [i for i in site if group_of(i) in val_groups]


# ---------------------------------------------------------------- summary and writing


def summarize(name: str, records: list, keys: Sequence[str], indices: list[int]) -> str:
    """One line: record and distinct image counts, then the modality mix in percent (the top MAX_MIX groups)."""
    mix = Counter(keys[i] for i in indices)
    images = len({os.path.normpath(path) for i in indices for path in record_images(records[i])})
    top = mix.most_common(len(mix) if len(mix) <= MAX_MIX + 1 else MAX_MIX)
    parts = [f"{key} {100 * count / len(indices):.0f}%" for key, count in top]
    rest = len(indices) - sum(count for _, count in top)
    if rest:
        parts.append(f"other {100 * rest / len(indices):.0f}%")
    return f"  {name:<14} {len(indices):>9,} records {images:>9,} images | {', '.join(parts)}"


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


def write_outputs(
    output_dir: Path, records: list, sites: list[list[int]], test: list[int], vals: list[list[int]] | None = None
) -> list[Path]:
    """Write every file to a temp name first, then rename them all, so a failure leaves earlier outputs intact.

    Files of an earlier run that this one does not replace (test.json, a site's val.json) are removed: they could
    share images with the new files."""
    vals = vals or [[] for _ in sites]
    targets = []
    for i, (site, val) in enumerate(zip(sites, vals, strict=True)):
        targets.append((output_dir / f"site-{i + 1}" / "train.json", site))
        if val:
            targets.append((output_dir / f"site-{i + 1}" / "val.json", val))
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
    written = {path for path, _ in targets}
    held_out = [output_dir / "test.json", *(output_dir / f"site-{i + 1}" / "val.json" for i in range(len(sites)))]
    for stale in held_out:
        if stale not in written and stale.exists():
            stale.unlink()
            print(f"Removed {stale} left by an earlier run (none asked for now; it could overlap the new files).")
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
        allow_abbrev=False,
        description=(
            "Split PubMedVision into <output_dir>/site-N/train.json (N = 1..num_clients), each site's held-out "
            "<output_dir>/site-N/val.json and, with --test_size, a held-out <output_dir>/test.json. Files keep the "
            "source's record format (a JSON list) with one '<image>\\n' per image added to the first human turn "
            "where missing. Records that share an image (directly or through other records, also across several "
            "--data_file files) form an image group, and a group goes whole to one file: no file shares an image "
            "with another, so record counts are met to within a group. Sites are shuffled with --seed. iid: equal "
            "sizes, at most floor(records / num_clients) each, the remainder is dropped. "
            "dirichlet: for each modality (else body_part) the site shares are drawn from Dirichlet(alpha), like "
            "hospitals with different equipment; site sizes then differ (not trimmed, as trimming to the smallest "
            "site would waste most data at small alpha) and --subset_size caps each site. All input is checked "
            "before anything is written; files are replaced atomically, and a test.json or val.json from an earlier "
            "run is removed when this run writes none (it could overlap the new files)."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--data_file",
        default=DEFAULT_DATA_FILE,
        help="local JSON list, or a comma list of them split together (e.g. the Alignment and InstructionTuning "
        "files); '' fetches --split_name from the Hub",
    )
    parser.add_argument(
        "--split_name", default="PubMedVision_InstructionTuning_VQA", help="Hub file without .json; comma list ok"
    )
    parser.add_argument("--repo_id", default=DEFAULT_REPO_ID, help="Hub dataset repo (with --data_file '')")
    parser.add_argument("--output_dir", default="./data", help="where site-N/{train,val}.json and test.json go")
    parser.add_argument("--num_clients", type=int, default=3, help="number of sites")
    parser.add_argument(
        "--subset_size", type=int, default=None, help="at most this many records per site (train + val together)"
    )
    parser.add_argument("--test_size", type=int, default=0, help="records held out in test.json, seen by no site")
    parser.add_argument(
        "--val_size",
        type=int,
        default=None,
        help="records of each site's shard held out in site-N/val.json (whole image groups, so about this many); "
        f"0: no val.json; unset: {round(DEFAULT_VAL_SHARE * 100)}%% of the shard, rounded up, "
        f"at most {DEFAULT_VAL_MAX}",
    )
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
    if args.val_size is not None and args.val_size < 0:
        parser.error(f"--val_size must be 0 or more, got {args.val_size}")
    if args.alpha <= 0:
        parser.error(f"--alpha must be positive, got {args.alpha}")
    if args.drop_bad_images and not args.check_images:
        parser.error("--drop_bad_images needs --check_images")
    if args.check_images and not args.data_file.strip() and not args.image_root:
        parser.error("--check_images with --data_file '' needs --image_root (the Hub file comes without images)")


def load_data_files(args: argparse.Namespace) -> tuple[list, Path]:
    """The records of every --data_file (or Hub --split_name) in order, each file validated; and the first file."""
    names = [name.strip() for name in args.data_file.split(",") if name.strip()]
    if names:
        paths = [Path(name) for name in names]
    else:
        paths = [fetch_from_hub(args.repo_id, name.strip()) for name in args.split_name.split(",") if name.strip()]
    records: list = []
    for path in paths:
        loaded = load_records(path)
        validate_records(loaded, str(path))
        records += loaded
    return records, paths[0]


def run(args: argparse.Namespace) -> None:
    records, data_file = load_data_files(args)
    if args.check_images:
        image_root = Path(args.image_root) if args.image_root else data_file.parent
        bad = find_bad_images(records, image_root)
        report_bad_images(records, bad)
        if records and len(bad) == len(records):
            raise PrepareError(
                f"every one of the {len(records):,} records has a missing or unreadable image under {image_root}: "
                "is --image_root right? Nothing was written."
            )
        if bad and args.drop_bad_images:
            drop = {index for index, _ in bad}
            records = [record for i, record in enumerate(records) if i not in drop]
            print(f"Dropped {len(drop)} record(s); {len(records)} remain.")
    keys = [group_key(record) for record in records]
    groups = image_groups(records)
    sizes = Counter(groups)
    sites, test = split_indices(
        len(records), args.num_clients, args.seed, args.test_size, args.subset_size, args.split, args.alpha, keys,
        groups,
    )  # fmt: skip
    splits = [split_validation(site, groups, args.val_size, f"site-{i + 1}") for i, site in enumerate(sites)]
    print(
        f"Split {len(records):,} records ({args.split}, seed {args.seed}) in {len(sizes):,} image groups "
        f"(records sharing an image; largest: {max(sizes.values()):,} records). No two files share an image:"
    )
    for i, (train, val) in enumerate(splits):
        print(summarize(f"site-{i + 1} train", records, keys, train))
        if val:
            print(summarize(f"site-{i + 1} val", records, keys, val))
    if test:
        print(summarize("test", records, keys, test))
    trains, vals = [train for train, _ in splits], [val for _, val in splits]
    paths = write_outputs(Path(args.output_dir), records, trains, test, vals)
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
