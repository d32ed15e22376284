"""README.md and FAULTS.md stay true: every flag they name exists, with the default they give, and every test they
name exists."""

import re
from dataclasses import asdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
FAULTS = (ROOT / "FAULTS.md").read_text()
# Flags of other programs: torchrun's, and install_requirements.sh's.
INSTALL = (ROOT / "install_requirements.sh").read_text()
OTHER_FLAGS = {"nproc_per_node"} | set(re.findall(r"--([a-z][a-z0-9_-]*)", INSTALL))
# A section about one script names its flags; the job's section also the sites' (`--train_args`).
SECTION_SCRIPTS = {
    "download_data.py": ["download_data.py"],
    "prepare_data.py": ["prepare_data.py"],
    "job.py": ["job.py", "client.py", "local_trainer.py"],
    "local_trainer.py": ["local_trainer.py"],
    "run_inference.py": ["run_inference.py"],
}


@pytest.fixture(scope="module")
def defaults() -> dict[str, dict]:
    """Each script's flags (by dest) and their defaults, from its own parser."""
    import client
    import download_data
    import job
    import local_trainer
    import prepare_data
    import run_inference

    return {
        "job.py": vars(job.define_parser().parse_args([])),
        "client.py": vars(client.parse_args([])[0]),
        "local_trainer.py": asdict(local_trainer.parse_train_args([])),
        "run_inference.py": vars(run_inference.parse_args([])),
        "prepare_data.py": vars(prepare_data.build_parser().parse_args([])),
        "download_data.py": vars(download_data.build_parser().parse_args([])),
    }


def sections(text: str) -> list[tuple[list[str] | None, str]]:
    """(scripts, text) per heading; a `###` section without a script belongs to its `##` section's."""
    out, top, scripts = [], None, None
    for part in re.split(r"(?m)^(?=#{2,3} )", text):
        heading = part.splitlines()[0] if part.startswith("#") else ""
        named = next((SECTION_SCRIPTS[s] for s in SECTION_SCRIPTS if f"`{s}`" in heading), None)
        if heading.startswith("## "):
            top = scripts = named
        elif heading.startswith("### "):
            scripts = named or top
        out.append((scripts, part))
    return out


def dest(flag: str) -> str:
    return re.sub(r"^no[-_]", "", flag).replace("-", "_")


def find(flag: str, scripts: list[str], defaults: dict[str, dict]) -> tuple[bool, object]:
    """Whether one of `scripts` has `flag`, and its default there."""
    for script in scripts:
        if dest(flag) in defaults[script]:
            return True, defaults[script][dest(flag)]
    return False, None


def same_default(text: str, actual: object) -> bool:
    """Whether the README's default `text` says `actual`; prose ('all', 'one epoch', 'with CUDA') is not checked."""
    text = text.strip()
    if actual is None:  # worked out at run time (e.g. 3 rounds, 2 with --demo)
        return True
    if quoted := re.fullmatch(r"`([^`]*)`", text):
        return str(actual) == quoted.group(1)
    words = text.replace(",", " ").replace(";", " ").split()
    if not words:
        return False
    if words[0] in ("on", "True", "off", "False"):
        return actual is (words[0] in ("on", "True"))
    try:
        if isinstance(actual, (list, tuple)):
            return [float(w) for w in words[: len(actual)]] == [float(a) for a in actual]
        return float(words[0]) == float(actual)
    except ValueError:
        return True


def test_every_flag_the_readme_names_exists_in_the_script_it_is_named_for(defaults):
    everywhere = list(defaults)
    missing = []
    for scripts, text in sections(README):
        for flag in re.findall(r"--([a-z][a-z0-9_-]*)", text):
            if flag not in OTHER_FLAGS and not find(flag, scripts or everywhere, defaults)[0]:
                missing.append(f"--{flag} ({', '.join(scripts or ['any script'])})")
    for flag in re.findall(r"--([a-z][a-z0-9_-]*)", FAULTS):
        if not find(flag, everywhere, defaults)[0]:
            missing.append(f"--{flag} (FAULTS.md)")
    assert not missing


def test_the_defaults_the_readme_gives_are_the_scripts_defaults(defaults):
    checked, wrong = 0, []
    for scripts, text in sections(README):
        if not scripts:
            continue
        said = []  # (flags, default text) from table rows "| `--a` / `--b` | 1 / 2 | ... |" and "`--a` (1)"
        for row in re.findall(r"(?m)^\| (`--[^|]*)\|([^|]*)\|", text):
            flags = re.findall(r"--([a-z0-9_]+)", row[0])
            values = row[1].strip().split(" / ")
            if values[0].endswith(" each"):
                values = [values[0].removesuffix(" each")] * len(flags)
            assert len(values) == len(flags), f"one default per flag: {row}"
            said += zip(flags, values, strict=True)
        said += re.findall(r"`--([a-z0-9_]+)` \(([^)]*)\)", text)
        for flag, value in said:
            found, actual = find(flag, scripts, defaults)
            assert found, f"--{flag} ({', '.join(scripts)})"
            checked += 1
            if not same_default(value, actual):
                wrong.append(f"--{flag}: README {value!r}, {actual!r} in fact")
    assert checked > 100
    assert not wrong


def test_every_test_that_faults_md_names_exists():
    named = re.findall(r"`(test_\w+\.py)::(test_\w+)`", FAULTS)
    assert len(named) >= 17
    missing = [f"{f}::{t}" for f, t in named if not re.search(rf"(?m)^def {t}\(", (ROOT / "tests" / f).read_text())]
    assert not missing


def test_the_readmes_links_to_other_files_and_their_sections_exist():
    for target, anchor in re.findall(r"\]\(([A-Z][A-Za-z_]*\.md)(?:#([a-z0-9-]+))?\)", README):
        text = (ROOT / target).read_text()
        if anchor:
            slugs = {
                re.sub(r"[^a-z0-9 -]", "", h.lower()).replace(" ", "-") for h in re.findall(r"(?m)^#+ (.*)$", text)
            }
            assert anchor in slugs, f"{target}#{anchor}"
