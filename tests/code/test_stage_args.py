"""The stages' `cmd:` lines in dvc.yaml parse both as the stage scripts and under torchrun.

Nodes of a multi-node training run the train stage's line after `torchrun ... `, and torchrun's
argparse reads every word of it: a stage flag that is a prefix of one of torchrun's own options
(`--run` of `--run-path`) stops torchrun with "ambiguous option" before any training starts.
"""

import shlex

import pytest
import yaml

from tests.conftest import REPO

STAGES = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def stage_words(stage: str) -> list[str]:
    """The words of a stage's `cmd:` after `python`, with `${data.name}` filled in."""
    return shlex.split(STAGES[stage]["cmd"].replace("${data.name}", "digits"))[1:]


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_torchrun_hands_every_stage_flag_to_the_script_untouched(stage):
    from torch.distributed.run import get_args_parser

    script, *flags = stage_words(stage)
    parsed = get_args_parser().parse_args(["--nproc-per-node=2", script, *flags])
    assert (parsed.training_script, parsed.training_script_args) == (script, flags)


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_no_stage_flag_is_a_prefix_of_a_torchrun_option(stage):
    from torch.distributed.run import get_args_parser

    options = [option for action in get_args_parser()._actions for option in action.option_strings]
    flags = [word for word in stage_words(stage) if word.startswith("--")]
    clashes = {flag: [o for o in options if o.startswith(flag) and o != flag] for flag in flags}
    assert {flag: found for flag, found in clashes.items() if found} == {}
