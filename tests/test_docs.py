"""The README and docs/ stay true: the site builds strictly and offline, every relative link and
anchor resolves, the quick-start commands are the ones CI runs, every ``pixeldiffusion`` command
shown parses, and the Python example runs against a real (tiny) trained run."""

import os
import re
import shlex
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest

from conftest import TINY
from pixeldiffusion import cli
from pixeldiffusion.config import load_config

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
PAGES = sorted((REPO / "docs").rglob("*.md"))
FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.M | re.S)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def code_blocks(text: str, language: str) -> list[str]:
    """The bodies of the fenced blocks opened with ```language."""
    return [m.group(2) for m in re.finditer(r"^```(\w*)\n(.*?)^```", text, re.M | re.S)
            if m.group(1) == language]


def prose(text: str) -> str:
    """The text outside fenced blocks and inline code, where a link is a link."""
    return re.sub(r"`[^`]*`", "", FENCE.sub("", text))


def github_slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def mkdocs_slug(heading: str) -> str:
    """Python-Markdown's toc anchor (what the site uses): ASCII, punctuation dropped, runs of
    spaces and hyphens to one hyphen."""
    ascii_text = unicodedata.normalize("NFKD", heading).encode("ascii", "ignore").decode()
    return re.sub(r"[-\s]+", "-", re.sub(r"[^\w\s-]", "", ascii_text).strip().lower())


def anchors(page: Path) -> set[str]:
    """Anchors that both GitHub and the MkDocs site give the page's headings."""
    headings = re.findall(r"^#{1,6} (.+?)\s*$", FENCE.sub("", page.read_text()), re.M)
    return {github_slug(h) for h in headings} & {mkdocs_slug(h) for h in headings}


def test_site_builds_strictly_and_offline(tmp_path):
    """``mkdocs build --strict`` fails on a dead link or anchor, a page missing from the nav and a
    docstring that does not match its signature. Proxies that lead nowhere make any download
    fail, and the built pages load nothing from other hosts."""
    site = tmp_path / "site"
    dead_end = "http://127.0.0.1:9"
    env = {**os.environ, "HTTP_PROXY": dead_end, "HTTPS_PROXY": dead_end,
           "http_proxy": dead_end, "https_proxy": dead_end, "NO_PROXY": "", "no_proxy": ""}
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(site)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    api = (site / "api" / "sampling" / "index.html").read_text()
    assert "pixeldiffusion.samplers" in api and "alphas_cumprod" in api
    loads_remote = re.compile(r"<(?:script|link)\b[^>]*(?:src|href)=\"(?:https?:)?//")
    for page in site.rglob("*.html"):
        remote = loads_remote.findall(page.read_text())
        assert not remote, f"{page.relative_to(site)} loads {remote} from another host"


def test_readme_is_a_front_door():
    assert len(README.read_text().splitlines()) <= 250


@pytest.mark.parametrize("page", [README, *PAGES], ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_point_at_files_and_anchors(page):
    text = page.read_text()
    assert not re.search(r"\]\(\s*/", prose(text)), "absolute paths break on GitHub and the site"
    for target in LINK.findall(prose(text)):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        assert linked.exists(), f"{page.name}: {target} does not exist"
        if anchor:
            assert anchor in anchors(linked), f"{page.name}: {target} has no such heading"


def test_quick_start_is_what_ci_runs():
    """The two commands are a product rule: the README and the site's home page show the same
    block, and ``.ci/run`` runs the second one verbatim."""
    quick = [block for block in code_blocks(README.read_text(), "bash")
             if "pixeldiffusion train" in block and "pytest" in block]
    assert len(quick) == 1
    setup_and_train, setup_and_test = quick[0].splitlines()
    train_args = setup_and_train.split(".venv/bin/pixeldiffusion train")[-1].split()
    assert train_args == ["-c", "configs/digits.yaml"]  # the quick-start recipe, a shipped file
    assert load_config(REPO / train_args[1]).data.dataset == "digits"  # the built-in data
    assert quick[0] in code_blocks((REPO / "docs" / "index.md").read_text(), "bash")
    ci_lines = (REPO / ".ci" / "run").read_text().strip().splitlines()
    assert ci_lines[-1] == setup_and_test


def shown_commands() -> list[tuple[str, str]]:
    """Every ``pixeldiffusion ...`` line of the bash blocks in the README and docs/, as
    (page, command), with continuation lines joined and comments dropped."""
    found = []
    for page in [README, *PAGES]:
        for block in code_blocks(page.read_text(), "bash"):
            for line in block.replace("\\\n", " ").splitlines():
                words = shlex.split(line, comments=True)
                if words[:1] == ["pixeldiffusion"]:
                    found.append((page.name, " ".join(words[1:])))
    return found


@pytest.mark.parametrize("page,command", shown_commands())
def test_every_shown_command_parses(page, command, monkeypatch):
    """The flags exist, take the values shown, and config overrides name real keys."""
    monkeypatch.chdir(REPO)
    args, extra = cli._parser().parse_known_args(shlex.split(command))
    if args.command in ("train", "distill"):  # both take --section.key overrides
        load_config(getattr(args, "config", None), extra)
    elif args.command == "eval":
        assert all(word.startswith("--sample.") for word in extra[::2]), extra
        load_config(None, extra)
    else:
        assert not extra, f"{page}: unknown arguments {extra}"


def test_python_examples_run_against_a_trained_run(tmp_path):
    """The README's example (and the Sampling page's copy of it), run as written against a
    tiny run in place of ``runs/digits``."""
    run_dir = tmp_path / "run"
    exe = Path(sys.executable).parent / "pixeldiffusion"
    trained = subprocess.run([str(exe), "train", "-e", str(run_dir), *TINY, "--no_progress"],
                             capture_output=True, text=True, timeout=300)
    assert trained.returncode == 0, trained.stderr[-3000:]
    examples = [block for page in (README, REPO / "docs" / "sampling.md")
                for block in code_blocks(page.read_text(), "python")
                if "runs/digits" in block]
    assert len(examples) == 2 and examples[0] == examples[1]
    work = tmp_path / "work"
    work.mkdir()
    code = examples[0].replace('"runs/digits"', repr(str(run_dir)))
    done = subprocess.run([sys.executable, "-c", code], cwd=work, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (work / "grid.png").stat().st_size > 0
