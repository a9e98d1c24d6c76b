"""lm-evaluation-harness on quantkit checkpoints: ``quantkit lm-eval``, and the offline task ``quantkit_emma``.

lm-eval's ``hf`` model loads a checkpoint with ``AutoModelForCausalLM.from_pretrained``, which knows
the ``"quantkit"`` quantization method only once quantkit is imported (:mod:`quantkit.formats.hf_hook`),
and lm-eval has no plugin hook that would import it. :func:`run_lm_eval` is lm-eval's own command
line run in a process that has imported quantkit: its arguments go through unchanged, plus
``--include_path`` naming the tasks shipped in ``quantkit/evaluation/lm_eval_tasks`` when none is
given. What can be checked cheaply (lm-eval installed, the ``pretrained=`` folder, the checkpoint's
tensors) is checked before lm-eval starts its slow work.

``quantkit_emma`` needs no network: its documents are the 55 chapters of the shipped *Emma* (the
text of quantkit's own perplexity protocol), scored whole with ``loglikelihood_rolling`` like
wikitext (word and byte perplexity, bits per byte).
"""

from __future__ import annotations

import importlib.metadata
import importlib.resources
import json
import logging
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from .._version import transformers_supported
from ..config import DEFAULT_MODEL
from ..core.record import QUANT_METHOD
from ..errors import QuantkitError

log = logging.getLogger(__name__)

TASKS_DIR = Path(str(importlib.resources.files("quantkit") / "evaluation" / "lm_eval_tasks"))
EMMA_TASK = "quantkit_emma"
MIN_LM_EVAL = (0, 4, 10)  # runs with transformers 5 (0.4.9 does not), reads custom_dataset in task YAMLs
_INSTALL_HINT = "pip install 'lm_eval>=0.4.10' (or pip install 'quantkit[lm-eval]')"
# lm-eval back ends that do not load models through transformers' from_pretrained.
_OWN_LOADERS = {"vllm": "vllm serves the compressed-tensors export: quantkit quantize ... --format compressed-tensors"}


def emma_chapters(**_metadata) -> dict:
    """The ``test`` split of ``quantkit_emma``: one document per chapter of the shipped *Emma*, in order.

    The file's hard line breaks inside paragraphs (it is wrapped at 70 columns) become spaces;
    paragraphs stay separated by a blank line. lm-eval passes the task's metadata; none is used.
    """
    import datasets

    from .measure import read_eval_text

    text = read_eval_text()
    chapters = re.split(r"^(?:VOLUME [IVX]+\s*\n\s*)?CHAPTER [IVX]+[ \t]*$", text, flags=re.M)[1:]
    docs = []
    for chapter in chapters:
        chapter = chapter.strip().removesuffix("FINIS").strip()
        paragraphs = re.split(r"\n\s*\n", chapter)
        docs.append({"text": "\n\n".join(" ".join(p.split()) for p in paragraphs)})
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(docs)})


def run_lm_eval(args: Sequence[str]) -> int:
    """Run lm-eval's command line with ``args`` (``lm_eval --help`` lists them) in this process, where
    quantkit's quantization method is registered with transformers. Returns 0 when it finishes (lm-eval's
    usage errors exit as lm-eval does; its other errors become one-line :class:`QuantkitError`)."""
    argv = prepare_args(args)
    from lm_eval.__main__ import cli_evaluate  # reads sys.argv, as the lm_eval command does

    saved = sys.argv
    sys.argv = ["lm-eval", *argv]
    try:
        cli_evaluate()
    except (QuantkitError, OSError):  # quantkit's loader on a bad checkpoint; a path lm-eval cannot write
        raise
    except Exception as e:  # lm-eval's own errors (an unknown task, a bad option value): its message, one line
        log.debug("lm-eval's traceback", exc_info=True)
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise QuantkitError(
            f"lm-eval: {reason} ('quantkit lm-eval run --help' lists its options, 'quantkit lm-eval ls tasks' "
            "its tasks)"
        ) from None
    finally:
        sys.argv = saved
    return 0


def prepare_args(args: Sequence[str]) -> list[str]:
    """``args`` for lm-eval, with quantkit's task folder added; bad input found here is a one-line
    :class:`QuantkitError`, before lm-eval is even imported."""
    _check_lm_eval()
    args = list(args)
    options = _options(args)
    if "--config" not in options:  # the model and tasks may come from the config file: lm-eval checks them
        _check_tasks(options)
        for pretrained in _pretrained(options):
            _check_model(pretrained, options.get("--model", ["hf"])[-1])
    # Add the shipped tasks' folder unless the user names a folder (lm-eval takes one) or a config
    # file (whose include_path a command-line one would override), or asks for help / nothing.
    if len(args) >= 2 and not {"--include_path", "--config", "--help"} & options.keys():
        args += ["--include_path", str(TASKS_DIR)]
    return args


# lm-eval's short options that quantkit reads, by their long names.
_SHORT = {"-M": "--model", "-a": "--model_args", "-t": "--tasks", "-C": "--config", "-h": "--help"}


def _options(args: list[str]) -> dict[str, list[str]]:
    """``{--option: its values}`` for every option in ``args`` (``--x=v`` and ``--x v1 v2`` forms)."""
    options: dict[str, list[str]] = {}
    current = None
    for a in args:
        if a.startswith("-") and not _is_number(a):
            name, eq, value = a.partition("=")
            current = options.setdefault(_SHORT.get(name, name), [])
            if eq:
                current.append(value)
        elif current is not None:
            current.append(a)
    return options


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _pretrained(options: dict[str, list[str]]) -> list[str]:
    """The ``pretrained`` values of ``--model_args`` (``k=v,k2=v2``, ``k=v k2=v2`` or a JSON object)."""
    found = []
    for value in options.get("--model_args", []):
        if value.lstrip().startswith("{"):
            try:
                parsed = json.loads(value)
            except json.JSONDecodeError:
                continue  # lm-eval says what is wrong with it
            if isinstance(parsed, dict) and isinstance(parsed.get("pretrained"), str):
                found.append(parsed["pretrained"])
            continue
        for pair in value.split(","):
            key, eq, val = pair.partition("=")
            if eq and key.strip() == "pretrained":
                found.append(val.strip())
    return found


def _check_lm_eval() -> None:
    try:
        version = importlib.metadata.version("lm_eval")
    except importlib.metadata.PackageNotFoundError:
        raise QuantkitError(f"lm-evaluation-harness is not installed: {_INSTALL_HINT}") from None
    numbers = tuple(int(n) for n in re.findall(r"\d+", version)[:3])
    if numbers < MIN_LM_EVAL:
        raise QuantkitError(f"lm_eval {version} is too old for quantkit lm-eval: {_INSTALL_HINT}")


def _check_tasks(options: dict[str, list[str]]) -> None:
    tasks = [t.strip() for value in options.get("--tasks", []) for t in value.split(",")]
    if EMMA_TASK in tasks and "--include_path" in options:
        raise QuantkitError(
            f"--include_path replaces quantkit's task folder, so lm-eval will not find {EMMA_TASK}; name the task "
            f"by its file instead: --tasks {TASKS_DIR / (EMMA_TASK + '.yaml')}"
        )


def _check_model(pretrained: str, model: str) -> None:
    from ..formats.float_models import cache_dir, is_hub_id

    if pretrained.startswith("~"):
        raise QuantkitError(
            f"pretrained={pretrained}: transformers does not expand ~; write the path out: "
            f"pretrained={Path(pretrained).expanduser()}"
        )
    path = Path(pretrained)
    if not path.exists():
        if pretrained == DEFAULT_MODEL:
            folder = cache_dir() / "models" / "smollm2-135m-instruct"
            raise QuantkitError(
                f"lm-eval does not know quantkit's name {DEFAULT_MODEL}; pass the folder it is prepared in: "
                f"pretrained={folder} (any quantkit command on {DEFAULT_MODEL} prepares it)"
            )
        if not is_hub_id(pretrained) and ("/" in pretrained or pretrained.startswith(".")):
            raise QuantkitError(f"model folder {pretrained} not found (--model_args pretrained=...); check the path")
        return  # a hub id: transformers finds it in the Hugging Face cache or downloads it
    if not (path / "config.json").is_file():
        raise QuantkitError(f"{pretrained} is not a model folder (no config.json); pass pretrained=FOLDER")
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise QuantkitError(f"{path / 'config.json'} is not valid JSON; the checkpoint is damaged") from None
    qc = config.get("quantization_config") if isinstance(config, dict) else None
    if not isinstance(qc, dict) or qc.get("quant_method") != QUANT_METHOD:
        return  # a float model, or another tool's format: transformers loads it as usual
    if model in _OWN_LOADERS:
        raise QuantkitError(f"lm-eval's {model} model cannot load quantkit checkpoints; {_OWN_LOADERS[model]}")
    if not transformers_supported():
        raise QuantkitError(
            "lm-eval loads models with transformers' from_pretrained, which loads quantkit checkpoints from "
            "transformers 5 on: pip install -U 'transformers>=5'"
        )
    from ..formats.native import checkpoint_problems
    from ..formats.validate import raise_problems

    raise_problems(pretrained, checkpoint_problems(path))
