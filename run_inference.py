"""Answer PubMedVision-style questions with a Qwen3-VL model, optionally next to a second one, and score the answers.

The model is a Hugging Face Hub ID, a Hugging Face directory (a trainer checkpoint or the job's exported global
model), the NVFlare server's `FL_global_model.pt` (architecture and processor then come from `--base_model`), or a
PEFT LoRA adapter folder (`--peft lora`'s `global_adapter/`, or a site's checkpoint): loaded onto the base model the
adapter names (else `--base_model`) and merged into it in fp32.
With `--compare`, a second model answers the same samples, so a base and a fine-tuned model can be read side by side.

Without --data_file it scores prepare_data.py's held-out ./data/test.json, or, when there is none, the training
shard ./data/site-1/train.json (with a warning); it prints which file it scored. `score_records` is the same
generation and scoring as a function, for evaluating a model in memory (e.g. on a site's val.json every round).

Examples:
  python run_inference.py --model_path Qwen/Qwen3-VL-2B-Instruct --data_file data/test.json
  python run_inference.py --model_path Qwen/Qwen3-VL-2B-Instruct --data_file data/test.json \
      --compare /tmp/nvflare/simulation/qwen3-vl/server/simulate_job/app_server/FL_global_model.pt \
      --num_samples 100 --batch_size 16 --output results.jsonl

Metrics (per sample, then averaged; answers and references are normalised SQuAD-style first: lower case, punctuation
removed, the articles a/an/the removed, whitespace collapsed):
  exact_match  1 if the normalised answer equals the normalised reference, else 0.
  token_f1     harmonic mean of precision and recall of the shared normalised tokens, counted as bags (multisets).
  rouge_l      F1 of the longest common subsequence (LCS) of normalised tokens: P = LCS/len(answer),
               R = LCS/len(reference), F = 2PR/(P+R).
  closed_acc   only for closed questions: those whose reference starts with "yes"/"no", or whose question offers
               lettered options ("A) ...", "(B) ..."). Correct when the answer gives the same yes/no (its first
               leading verdict: its first word, case and punctuation aside) or the same option letter (an explicit
               "(B)", "B)", a bare "B"/"B." at the start,
               "answer is B", or else the one option whose text the answer contains).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import re
import string
import sys
import tempfile
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from model import DEFAULT_MODEL, TIED_LM_HEAD, is_tied, load_hf_model

IMAGE_TAG = re.compile(r"<image>\s*")
CHECKPOINT_SUFFIXES = (".pt", ".pth")
# Local-looking strings that cannot be Hub IDs: a Hub ID is "name" or "owner/name" of letters, digits, "-_.".
HUB_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*$")
PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")
USER_ERROR_EXIT = 2
TEST_FILE = "./data/test.json"  # prepare_data.py --test_size writes it: records no site trains on
TRAIN_SHARD = "./data/site-1/train.json"  # scored only when there is no test file


class UserError(Exception):
    """A problem with the user's input: reported as one message, without a traceback."""


@dataclass
class Sample:
    """One question to answer: its images, the question text (no `<image>` tags) and the reference answer."""

    index: int
    id: str
    image_paths: list[Path]
    question: str
    ground_truth: str


# ------------------------------------------------------------------------------------------------------- data


def load_records(data_file: str | os.PathLike) -> list[dict]:
    """The JSON list of PubMedVision-style records in `data_file`."""
    path = Path(data_file)
    if not path.is_file():
        raise UserError(f"data file not found: {path} (run prepare_data.py first, or pass --data_file)")
    try:
        records = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(records, list) or not records:
        raise UserError(f"{path} must hold a non-empty JSON list of records")
    return records


def select_indices(num_records: int, num_samples: int, seed: int | None) -> list[int]:
    """The first `num_samples` records, or, with a seed, a reproducible random sample of them (0 means all)."""
    n = num_records if num_samples <= 0 else min(num_samples, num_records)
    if seed is None:
        return list(range(n))
    return random.Random(seed).sample(range(num_records), n)


def _first_turn(conversations: list[dict], speaker: str) -> str | None:
    return next((turn.get("value", "") for turn in conversations if turn.get("from") == speaker), None)


def record_to_sample(record: dict, index: int, image_root: str | os.PathLike) -> Sample:
    """A `Sample` from one record; images are resolved against `image_root` and must exist."""
    record_id = str(record.get("id", f"#{index}"))
    images = record.get("image") or []
    images = [images] if isinstance(images, str) else images
    conversations = record.get("conversations") or []
    question = _first_turn(conversations, "human")
    if question is None:
        raise UserError(f"record {record_id} (index {index}) has no human turn")
    image_paths = []
    for image in images:
        from local_trainer import resolve_image  # the trainer's rule: relative paths that stay inside the root

        try:
            path = resolve_image(Path(image_root), image, record_id)
        except ValueError as err:
            raise UserError(str(err)) from None
        if not path.is_file():
            raise UserError(f"record {record_id}: image not found: {path} (is --image_root right?)")
        image_paths.append(path.resolve())
    return Sample(
        index=index,
        id=record_id,
        image_paths=image_paths,
        question=IMAGE_TAG.sub("", question).strip(),
        ground_truth=(_first_turn(conversations, "gpt") or "").strip(),
    )


def load_samples(data_file: str, image_root: str, num_samples: int, seed: int | None) -> list[Sample]:
    """The samples to run, chosen by `select_indices`, with their images checked up front."""
    records = load_records(data_file)
    return [record_to_sample(records[i], i, image_root) for i in select_indices(len(records), num_samples, seed)]


def load_images(sample: Sample) -> list:
    """The sample's images as RGB PIL images."""
    from PIL import Image, UnidentifiedImageError

    images = []
    for path in sample.image_paths:
        try:
            with Image.open(path) as image:
                images.append(image.convert("RGB"))
        except (OSError, UnidentifiedImageError) as err:
            raise UserError(f"record {sample.id}: cannot read image {path}: {err}") from None
    return images


# ------------------------------------------------------------------------------------------------------ models


def model_kind(model_path: str) -> str:
    """'checkpoint' (a server .pt file), 'adapter' (a PEFT adapter folder), 'directory' (a Hugging Face folder) or
    'hub' (a Hub ID)."""
    path = Path(model_path)
    if path.is_file() and path.suffix in CHECKPOINT_SUFFIXES:
        return "checkpoint"
    if path.is_dir() and (path / "adapter_config.json").is_file():
        return "adapter"
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"{model_path} is a directory but not a Hugging Face model (no config.json in it)")
        return "directory"
    if path.exists():
        raise UserError(f"{model_path} is neither a Hugging Face directory nor a .pt checkpoint")
    if HUB_ID.match(model_path) and not model_path.endswith(CHECKPOINT_SUFFIXES):
        return "hub"
    raise UserError(f"model not found: {model_path} is no existing file or directory, nor a Hub ID like 'owner/name'")


def _from_hub(loader, name_or_path: str, what: str):
    """Call a `from_pretrained`-style loader and turn a failed Hub look-up into a `UserError`."""
    from model import hub_problem

    if problem := hub_problem(name_or_path):  # at once, not after a minute of retries
        raise UserError(f"could not load the {what} {name_or_path!r} ({problem})")
    try:
        return loader(name_or_path)
    except OSError as err:
        offline = (
            " (HF_HUB_OFFLINE is set, so only the local cache is used)" if os.environ.get("HF_HUB_OFFLINE") else ""
        )
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"could not load the {what} {name_or_path!r}{offline}: {first_line}") from None


def read_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The state dict in a server checkpoint: `{"model": state_dict, ...}` as NVFlare saves it, or a bare one."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # torch raises several types for bad or unsafe files; all mean "not loadable"
        raise UserError(f"cannot load {path} as a weights-only torch checkpoint: {err}") from None
    state = data.get("model", data) if isinstance(data, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path} holds no state dict of tensors (expected {{'model': state_dict}} or a state dict)")
    return state


def align_keys(state: dict[str, torch.Tensor], expected: set[str]) -> dict[str, torch.Tensor]:
    """The state dict as is or with one leading "model." stripped from its keys, whichever fits `expected` better."""
    stripped = {k.removeprefix("model."): v for k, v in state.items()}
    return max((state, stripped), key=lambda s: len(expected & s.keys()))


def apply_checkpoint(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str, base: str) -> None:
    """Load a full-model state dict into `model`, or explain how the keys fail to fit."""
    expected = model.state_dict()
    state = align_keys(state, set(expected))
    optional = {TIED_LM_HEAD} if is_tied(model) else set()
    missing = sorted(set(expected) - state.keys() - optional)
    unexpected = sorted(state.keys() - expected.keys())
    wrong_shape = sorted(k for k in state.keys() & expected.keys() if state[k].shape != expected[k].shape)
    problems = [
        f"{len(keys)} {what} (e.g. {keys[:3]})"
        for keys, what in (
            (missing, "missing keys"),
            (unexpected, "unexpected keys"),
            (wrong_shape, "keys of another shape"),
        )
        if keys
    ]
    if problems:
        raise UserError(
            f"{source} does not fit the base model {base}: {', '.join(problems)}. "
            "Is --base_model the model the job was trained from?"
        )
    model.load_state_dict(state, strict=False)
    model.tie_weights()


def load_processor(source: str, min_pixels: int, max_pixels: int):
    """The processor, padding on the left (prompts must end where generation starts) and sized like training."""
    from transformers import AutoProcessor

    processor = _from_hub(AutoProcessor.from_pretrained, source, "processor")
    processor.tokenizer.padding_side = "left"
    if max_pixels > 0:
        processor.image_processor.size = {"shortest_edge": min_pixels, "longest_edge": max_pixels}
    return processor


def load_model(model_path: str, base_model: str, device: str, dtype: torch.dtype, min_pixels: int, max_pixels: int):
    """(model, processor) for any of the three kinds of `model_path`, in eval mode on `device`."""
    kind = model_kind(model_path)
    if kind == "adapter":
        from lora import adapter_base_model, load_merged

        base = adapter_base_model(model_path) or base_model
        model = _from_hub(lambda name: load_merged(name, model_path, dtype), base, "adapter's base model")
        processor_source = base
    elif kind == "checkpoint":
        state = read_checkpoint(model_path)
        if any(key.startswith("base_model.model.") for key in state):  # lora.PEFT_PREFIX
            raise UserError(f"{model_path} holds a LoRA adapter (--peft lora): pass the global_adapter/ beside it")
        model = _from_hub(lambda name: load_hf_model(name, dtype=dtype), base_model, "base model")
        apply_checkpoint(model, state, model_path, base_model)
        processor_source = base_model
    else:
        model = _from_hub(lambda name: load_hf_model(name, dtype=dtype), model_path, "model")
        has_processor = kind == "hub" or any((Path(model_path) / f).is_file() for f in PROCESSOR_FILES)
        processor_source = model_path if has_processor else base_model
    processor = load_processor(processor_source, min_pixels, max_pixels)
    return model.to(device).eval(), processor


# -------------------------------------------------------------------------------------------------- generation


def build_messages(num_images: int, question: str) -> list[dict]:
    """One user turn: the images first, then the question."""
    content = [{"type": "image"} for _ in range(num_images)]
    content.append({"type": "text", "text": question})
    return [{"role": "user", "content": content}]


def generate_token_ids(
    model, processor, prompts: Sequence[tuple[list, str]], max_new_tokens: int, **generate_kwargs
) -> torch.Tensor:
    """The new tokens generated for a batch of (images, question) prompts, one row each, padded on the right.

    Prompts are left-padded, so every row's answer starts at the same column.
    """
    texts = [
        processor.apply_chat_template(build_messages(len(images), question), tokenize=False, add_generation_prompt=True)
        for images, question in prompts
    ]
    images = [image for prompt_images, _ in prompts for image in prompt_images]
    inputs = processor(text=texts, images=images or None, padding=True, return_tensors="pt").to(model.device)
    with torch.inference_mode():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, **generate_kwargs)
    return output[:, inputs["input_ids"].shape[1] :]


def decode_answers(processor, token_ids: torch.Tensor) -> list[str]:
    """Answer texts without special tokens or surrounding whitespace."""
    return [text.strip() for text in processor.batch_decode(token_ids, skip_special_tokens=True)]


def generate_answers(
    model, processor, prompts: Sequence[tuple[list, str]], max_new_tokens: int, **generate_kwargs
) -> list[str]:
    """Answers for a batch of (images, question) prompts: the one generation path of this script and its benchmark."""
    return decode_answers(processor, generate_token_ids(model, processor, prompts, max_new_tokens, **generate_kwargs))


def batches(items: Sequence, size: int) -> Iterator[Sequence]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def answer_samples(
    model, processor, samples: list[Sample], batch_size: int, label: str, progress: bool = True, **generate_kwargs
) -> list[str]:
    """Answers for all samples, in batches, with a progress bar unless `progress` is False."""
    from tqdm import tqdm

    answers: list[str] = []
    total = (len(samples) + batch_size - 1) // batch_size
    bar = tqdm(
        batches(samples, batch_size), total=total, desc=f"Model {label}", unit="batch", file=sys.stderr,
        disable=not progress,
    )  # fmt: skip
    for batch in bar:
        prompts = [(load_images(sample), sample.question) for sample in batch]
        answers += generate_answers(model, processor, prompts, **generate_kwargs)
    return answers


# ----------------------------------------------------------------------------------------------------- metrics


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lower case, no punctuation, no articles (a, an, the), single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in string.punctuation)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(reference))


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD token F1 over bags of normalised tokens; 1.0 when both are empty, 0.0 when only one is."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    shared = sum((Counter(pred) & Counter(ref)).values())
    if shared == 0:
        return 0.0
    precision, recall = shared / len(pred), shared / len(ref)
    return 2 * precision * recall / (precision + recall)


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence, by dynamic programming over one row at a time."""
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1: LCS-based precision and recall over normalised tokens."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    lcs = lcs_length(pred, ref)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


OPTION_MARKER = re.compile(r"(?<![\w(])\(([A-Z])\)|(?<![\w(])([A-Z])\)")
LEADING_LETTER = re.compile(
    r"^\s*(?:(?:the\s+)?(?:correct\s+)?(?:answer|option)\s*(?:is)?\s*:?\s*)?([A-Z])(?:[.:]|\s*$)", re.I
)
ANSWER_IS_LETTER = re.compile(r"\b(?:answer|option)\s*(?:is)?\s*:?\s*\(?([A-Z])\b(?!['\w])")


def parse_options(question: str) -> dict[str, str]:
    """Lettered options offered by a question ("A) x", "(B) y"): letter -> option text; empty if fewer than two."""
    markers = list(OPTION_MARKER.finditer(question))
    options = {}
    for i, marker in enumerate(markers):
        end = markers[i + 1].start() if i + 1 < len(markers) else len(question)
        text = question[marker.end() : end].split("\n")[0]
        options.setdefault(marker.group(1) or marker.group(2), re.sub(r"(?:,|;|\bor)\s*$", "", text.strip()).strip())
    return options if len(options) >= 2 else {}


def chosen_option(answer: str, options: dict[str, str]) -> str | None:
    """The option letter an answer gives: an explicit marker or letter, else the one option whose text it contains."""
    for pattern in (OPTION_MARKER, LEADING_LETTER, ANSWER_IS_LETTER):
        for match in pattern.finditer(answer):
            letter = next(g for g in match.groups() if g).upper()
            if letter in options:
                return letter
    normalized = f" {normalize_answer(answer)} "
    hits = [k for k, text in options.items() if normalize_answer(text) and f" {normalize_answer(text)} " in normalized]
    return hits[0] if len(hits) == 1 else None


def yes_no(answer: str) -> str | None:
    """The answer's leading verdict: 'yes' or 'no' when its first normalised word is one ("Yes, ..." and "No." count;
    "No lesion is seen, yes" is 'no'), else None (an answer that does not start with a verdict gives none)."""
    words = normalize_answer(answer).split()
    return words[0] if words and words[0] in ("yes", "no") else None


def closed_label(question: str, ground_truth: str) -> dict | None:
    """{"kind": "option"|"yes_no", "label": ...} for a closed question, None for an open one."""
    options = parse_options(question)
    if options and (letter := chosen_option(ground_truth, options)):
        return {"kind": "option", "label": letter, "options": options}
    if label := yes_no(ground_truth):
        return {"kind": "yes_no", "label": label}
    return None


def closed_correct(answer: str, closed: dict | None) -> bool | None:
    """Whether the answer gives the reference's yes/no or option letter; None for open questions."""
    if closed is None:
        return None
    given = chosen_option(answer, closed["options"]) if closed["kind"] == "option" else yes_no(answer)
    return given == closed["label"]


def score(answer: str, sample: Sample, closed: dict | None) -> dict:
    return {
        "exact_match": exact_match(answer, sample.ground_truth),
        "token_f1": token_f1(answer, sample.ground_truth),
        "rouge_l": rouge_l(answer, sample.ground_truth),
        "closed_correct": closed_correct(answer, closed),
    }


def score_answers(samples: Sequence[Sample], answers: Sequence[str]) -> tuple[list[dict | None], list[dict]]:
    """Each sample's closed-question label (None: open) and the scores of its answer."""
    closed = [closed_label(s.question, s.ground_truth) for s in samples]
    return closed, [score(a, s, c) for a, s, c in zip(answers, samples, closed, strict=True)]


def summarize(scores: list[dict]) -> dict:
    """Mean of each metric; closed-question accuracy over the closed samples only."""
    summary = {m: sum(s[m] for s in scores) / len(scores) for m in ("exact_match", "token_f1", "rouge_l")}
    closed = [s["closed_correct"] for s in scores if s["closed_correct"] is not None]
    summary["closed_acc"] = sum(closed) / len(closed) if closed else None
    summary["num_closed"] = len(closed)
    return summary


# --------------------------------------------------------------------------------------- scoring a model in memory


def answer_records(
    model,
    processor,
    records: Sequence[dict],
    image_root: str | os.PathLike,
    max_samples: int = 0,
    batch_size: int = 8,
    max_new_tokens: int = 256,
    **generate_kwargs,
) -> tuple[list[Sample], list[str]]:
    """The first `max_samples` records (0: all) as samples, and `model`'s greedy answers to them, in batches.

    For the call, the model is in eval mode and the tokenizer pads on the left (as batched generation needs); both
    are restored after. Raises `UserError` naming a record without a human turn or with a missing image.
    """
    samples = [record_to_sample(r, i, image_root) for i, r in enumerate(records[: max_samples or None])]
    if not samples:
        raise UserError("no records to score")
    tokenizer = processor.tokenizer
    was_training, padding_side = model.training, tokenizer.padding_side
    model.eval()
    tokenizer.padding_side = "left"
    try:
        kwargs = {"max_new_tokens": max_new_tokens, "do_sample": False, **generate_kwargs}
        answers = answer_samples(model, processor, samples, batch_size, "", progress=False, **kwargs)
    finally:
        model.train(was_training)
        tokenizer.padding_side = padding_side
    return samples, answers


def score_records(
    model,
    processor,
    records: Sequence[dict],
    image_root: str | os.PathLike,
    max_samples: int = 0,
    batch_size: int = 8,
    max_new_tokens: int = 256,
    **generate_kwargs,
) -> dict[str, float]:
    """Mean metrics of `model`'s greedy answers to the first `max_samples` records (0: all), as `answer_records`.

    Keys: exact_match, token_f1, rouge_l, closed_acc (NaN when no record is a closed question), num_samples and
    num_closed. Imports nothing beyond torch and transformers, so a federated client can call it every round.
    """
    samples, answers = answer_records(
        model, processor, records, image_root, max_samples, batch_size, max_new_tokens, **generate_kwargs
    )
    summary = summarize(score_answers(samples, answers)[1])
    closed_acc = float("nan") if summary["closed_acc"] is None else summary["closed_acc"]
    return {**summary, "closed_acc": closed_acc, "num_samples": len(samples)}


# ------------------------------------------------------------------------------------------------------ output


def shorten(text: str, limit: int) -> str:
    return text[:limit] + "..." if 0 < limit < len(text) else text


def print_samples(samples: list[Sample], runs: list[tuple[str, str, list[str]]], limit: int) -> None:
    """Images, question, reference and each model's answer, sample by sample."""
    for n, sample in enumerate(samples):
        print(f"--- Sample {n + 1}/{len(samples)} (id {sample.id}) ---")
        print(f"Images ({len(sample.image_paths)}): {', '.join(map(str, sample.image_paths))}")
        print(f"Q: {shorten(sample.question, limit)}")
        print(f"Ground truth: {shorten(sample.ground_truth, limit)}")
        for label, path, answers in runs:
            name = "Model" if len(runs) == 1 else f"Model ({label}: {path})"
            print(f"{name}: {shorten(answers[n], limit) or '(empty answer)'}")
        print()


def print_summary(runs: list[tuple[str, str, list[str]]], summaries: list[dict], num_samples: int) -> None:
    print(f"=== Metrics over {num_samples} samples, {summaries[0]['num_closed']} of them closed ===")
    print(f"{'model':<8}{'exact_match':>13}{'token_f1':>10}{'rouge_l':>10}{'closed_acc':>12}  path")
    for (label, path, _), s in zip(runs, summaries, strict=True):
        acc = "n/a" if s["closed_acc"] is None else f"{s['closed_acc']:.3f}"
        print(f"{label:<8}{s['exact_match']:>13.3f}{s['token_f1']:>10.3f}{s['rouge_l']:>10.3f}{acc:>12}  {path}")


def write_jsonl_atomically(path: str | os.PathLike, rows: list[dict]) -> None:
    """Write all rows to a temporary file next to `path`, then rename it over `path`."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def result_rows(samples: list[Sample], runs, closed: list[dict | None], scores: list[list[dict]]) -> list[dict]:
    rows = []
    for n, sample in enumerate(samples):
        models = {
            label: {"model_path": path, "answer": answers[n], **run_scores[n]}
            for (label, path, answers), run_scores in zip(runs, scores, strict=True)
        }
        kind = closed[n] and {"kind": closed[n]["kind"], "label": closed[n]["label"]}
        rows.append(
            {
                "index": sample.index,
                "id": sample.id,
                "images": [str(p) for p in sample.image_paths],
                "question": sample.question,
                "ground_truth": sample.ground_truth,
                "closed": kind,
                "models": models,
            }
        )
    return rows


# --------------------------------------------------------------------------------------------------------- CLI


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        allow_abbrev=False, description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument(
        "--model_path",
        default=DEFAULT_MODEL,
        help="Hugging Face Hub ID, Hugging Face directory, or the server's FL_global_model.pt",
    )
    parser.add_argument("--compare", help="a second model (same kinds as --model_path) to answer the same samples")
    parser.add_argument(
        "--base_model",
        default=DEFAULT_MODEL,
        help="architecture and processor for a .pt checkpoint; processor for a directory that has none",
    )
    parser.add_argument(
        "--data_file",
        default=None,
        help=f"JSON list of records; unset: {TEST_FILE} (held out by prepare_data.py --test_size) if it exists, "
        f"else the training shard {TRAIN_SHARD}",
    )
    parser.add_argument("--image_root", default="./PubMedVision", help="folder that relative image paths start from")
    parser.add_argument("--num_samples", type=int, default=5, help="how many records to answer; 0 for all")
    parser.add_argument(
        "--seed",
        type=int,
        default=None,
        help="draw a random sample of records with this seed; None takes the first N records in file order",
    )
    parser.add_argument("--batch_size", type=int, default=8, help="prompts generated together (left-padded)")
    parser.add_argument("--max_new_tokens", type=int, default=256, help="longest answer, in tokens")
    parser.add_argument("--do_sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, default=0.7, help="with --do_sample")
    parser.add_argument("--top_p", type=float, default=0.8, help="with --do_sample")
    parser.add_argument("--min_pixels", type=int, default=784, help="smallest image area after resizing")
    parser.add_argument(
        "--max_pixels",
        type=int,
        default=50176,
        help="largest image area, as local_trainer's default; 0 keeps the processor's",
    )
    parser.add_argument(
        "--device", default="auto", help="'auto' (cuda if available, else cpu), 'cuda', 'cuda:1', 'cpu'"
    )
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "bfloat16", "float16", "float32"],
        help="'auto' is bfloat16 on GPU, float32 on CPU",
    )
    parser.add_argument("--max_print_chars", type=int, default=200, help="truncate printed texts; 0 prints them whole")
    parser.add_argument("--output", help="write one JSON line per sample (answers and metrics) to this file")
    args = parser.parse_args(argv)
    if args.batch_size < 1 or args.max_new_tokens < 1:
        parser.error("--batch_size and --max_new_tokens must be at least 1")
    return args


def resolve_device_dtype(device: str, dtype: str) -> tuple[str, torch.dtype]:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device}, but torch sees no CUDA GPU (use --device cpu or auto)")
    if dtype == "auto":
        dtype = "float32" if device == "cpu" else "bfloat16"
    return device, getattr(torch, dtype)


def generation_kwargs(args: argparse.Namespace) -> dict:
    kwargs = {"max_new_tokens": args.max_new_tokens, "do_sample": args.do_sample}
    if args.do_sample:
        kwargs.update(temperature=args.temperature, top_p=args.top_p)
    return kwargs


def check_inputs(args: argparse.Namespace) -> None:
    """Fail on bad paths before any model is loaded."""
    for path in filter(None, (args.model_path, args.compare)):
        if model_kind(path) == "checkpoint":
            model_kind(args.base_model)
    if args.output and not Path(args.output).resolve().parent.is_dir():
        raise UserError(f"--output: folder {Path(args.output).resolve().parent} does not exist")


def resolve_data_file(data_file: str | None) -> str:
    """--data_file, else the held-out test file if it exists, else the first site's training shard (with a warning)."""
    if data_file:
        return data_file
    if Path(TEST_FILE).is_file():
        return TEST_FILE
    print(
        f"Warning: no {TEST_FILE} (prepare_data.py --test_size writes one), so scoring the training shard "
        f"{TRAIN_SHARD}: scores on data a site trained on say little about what the model learned.",
        file=sys.stderr,
    )
    return TRAIN_SHARD


def run(args: argparse.Namespace) -> list[dict]:
    """Answer, print and score; return the per-sample result rows."""
    check_inputs(args)
    args.data_file = resolve_data_file(args.data_file)
    print(f"Scoring {args.data_file}", flush=True)
    samples = load_samples(args.data_file, args.image_root, args.num_samples, args.seed)
    device, dtype = resolve_device_dtype(args.device, args.dtype)
    print(
        f"Answering {len(samples)} samples from {args.data_file} on {device} ({str(dtype).removeprefix('torch.')})",
        flush=True,
    )
    runs = []
    for label, path in (("A", args.model_path), ("B", args.compare)):
        if path is None:
            continue
        if args.seed is not None:
            torch.manual_seed(args.seed)  # only matters with --do_sample
        print(f"Loading model {label}: {path}", flush=True)
        model, processor = load_model(path, args.base_model, device, dtype, args.min_pixels, args.max_pixels)
        answers = answer_samples(model, processor, samples, args.batch_size, label, **generation_kwargs(args))
        runs.append((label, path, answers))
        del model  # free it before the next model loads
        gc.collect()
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    print()
    print_samples(samples, runs, args.max_print_chars)
    closed = [closed_label(s.question, s.ground_truth) for s in samples]
    scores = [score_answers(samples, answers)[1] for _, _, answers in runs]
    print_summary(runs, [summarize(s) for s in scores], len(samples))
    print(f"Scored {args.data_file}")
    rows = result_rows(samples, runs, closed, scores)
    if args.output:
        write_jsonl_atomically(args.output, rows)
        print(f"Wrote {len(rows)} result lines to {args.output}")
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        run(args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return USER_ERROR_EXIT
    return 0


if __name__ == "__main__":
    sys.exit(main())
