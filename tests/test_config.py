"""Each option is described once, in ``Config``: the command line, validation and the resume
check are read off that description, so none of them can miss an option."""
import dataclasses

import pytest

from localpipe.launch.options import build_parser, parse_config
from localpipe.stages.config import Config, ConfigError, cli_flag, resumed_fields

FIELDS = dataclasses.fields(Config)


def test_the_command_line_offers_every_option_with_the_configs_default():
    parser = build_parser()
    dests = {a.dest for a in parser._actions if a.dest != "help"}
    assert dests == {f.name for f in FIELDS if f.metadata["cli"]}
    assert {f.name for f in FIELDS if not f.metadata["cli"]} == {"network"}  # lp.fit's own
    cfg = parse_config([])
    assert cfg == Config().validate()
    for f in FIELDS:  # every flag as the config spells it
        if f.metadata["cli"]:
            assert any(cli_flag(f) in a.option_strings for a in parser._actions), f.name


def test_every_option_is_checked_by_its_own_description():
    """A value outside an option's choices, sign or interval is refused naming the option."""
    checked = 0
    for f in FIELDS:
        meta = f.metadata
        bad = ("nonsense" if meta["choices"] else -1 if meta["check"] else
               -1.0 if meta["within"] else None)
        if bad is None:
            continue
        with pytest.raises(ConfigError, match=meta["noun"] or cli_flag(f)):
            Config(**{f.name: bad}).validate()
        checked += 1
    assert checked > 30


def test_whatever_defines_the_model_must_match_on_resume():
    """Model options always, training options unless they say otherwise (the length of the
    run and the batch, which is checked as the global batch), run options never."""
    parts = {f.name: f.metadata["part"] for f in FIELDS}
    assert set(parts.values()) == {"model", "training", "run"}
    resumed = set(resumed_fields())
    assert {n for n, p in parts.items() if p == "model"} <= resumed
    assert {n for n, p in parts.items() if p == "training"} - resumed == {"epochs",
                                                                         "batch_size"}
    assert not {n for n, p in parts.items() if p == "run"} & resumed
