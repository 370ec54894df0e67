"""The command table and the settings-to-flags mapping: every command resolves, every flag is one field of
its settings, the parser's defaults are the dataclass's, and held settings (SamplingParams) lend their flags."""

import dataclasses
import inspect
import typing

import pytest

from nanoseek.cli import COMMANDS, build_parser, chosen, load
from nanoseek.flags import flag, from_args

NAMES = [c.name for c in COMMANDS]
REQUIRED = object()  # a field without a default: its flag must be given


@pytest.mark.parametrize("command", COMMANDS, ids=NAMES)
def test_every_command_names_a_settings_dataclass_and_a_run_function_of_it(command):
    settings, run = load(command.settings), load(command.run)
    assert (
        dataclasses.is_dataclass(settings) and settings.__doc__ and not settings.__doc__.startswith(settings.__name__)
    )
    assert len(inspect.signature(run).parameters) == 1


def flag_defaults(cls: type, held=None) -> dict:
    """The fields that are flags, held settings' included (with the holder's defaults), with their defaults."""
    hints, defaults = typing.get_type_hints(cls), {}
    for f in dataclasses.fields(cls):
        if held is not None and "help" in f.metadata:
            defaults[f.name] = getattr(held, f.name)
        elif dataclasses.is_dataclass(hints[f.name]):
            defaults |= flag_defaults(hints[f.name], f.default_factory())
        elif "help" in f.metadata and f.default is not dataclasses.MISSING:
            defaults[f.name] = f.default
        elif "help" in f.metadata:
            defaults[f.name] = f.default_factory() if f.default_factory is not dataclasses.MISSING else REQUIRED
    return defaults


def subparser(name: str):
    parser = build_parser(name)
    for word in name.split():
        parser = next(a for a in parser._actions if a.dest in ("command", "action")).choices[word]
    return parser


@pytest.mark.parametrize("name", NAMES)
def test_each_option_has_one_name_and_the_dataclass_default(name):
    settings = load(next(c for c in COMMANDS if c.name == name).settings)
    actions = [a for a in subparser(name)._actions if a.dest not in ("help",)]
    assert all(len([s for s in a.option_strings if not s.startswith("--no-")]) <= 1 for a in actions)
    flat = flag_defaults(settings)
    assert {a.dest for a in actions} == set(flat)
    for action in actions:
        if flat[action.dest] is REQUIRED:
            assert action.required or not action.option_strings  # a positional is required by nature
        else:
            assert action.default == flat[action.dest] and not action.required


def test_held_settings_lend_their_flags_and_build_from_them():
    argv = ["generate", "--model", "m", "--prompt", "p", "--temperature", "0", "--stop", "a", "b", "--no-stream"]
    cfg = from_args(load("serve.config:GenerateConfig"), build_parser("generate").parse_args(argv))
    assert (cfg.model, cfg.prompt, cfg.stream, cfg.engine.enforce_eager) == ("m", "p", False, False)
    assert cfg.sampling.temperature == 0 and cfg.sampling.stop == ["a", "b"] and cfg.sampling.logit_bias == {}


def test_subclass_and_holder_defaults_reach_the_flags_one_engine_option_one_name():
    generate = build_parser("generate").parse_args(["generate", "--model", "m", "--prompt", "p", "--enforce-eager"])
    grpo = from_args(load("rl.config:GRPOConfig"), build_parser("grpo").parse_args(["grpo", "--model", "m"]))
    assert generate.enforce_eager is True and generate.max_seqs == 64
    assert grpo.engine.max_seqs == 256 and grpo.engine.enforce_eager is False  # sized for batches of rollouts
    sft = build_parser("sft").parse_args(["sft", "--model", "m", "--data", "d"])
    assert (sft.steps, sft.lr, sft.out) == (200, 1e-3, "runs/sft")


@pytest.mark.parametrize(
    ("argv", "name"),
    [
        (["task", "write", "--n", "3"], "task write"),
        (["tokenizer", "train", "--help"], "tokenizer train"),
        (["task", "--help"], None),
        (["--help"], None),
        (["plot", "runs/x"], "plot"),
        ([], None),
        (["nosuch"], None),
    ],
)
def test_the_chosen_command_is_read_before_parsing(argv, name):
    assert chosen(argv) == name


def test_model_source_refuses_a_preset_and_a_folder_together(capsys):
    from nanoseek.cli import main

    assert main(["info", "--preset", "tiny", "--model", "x"]) == 2
    assert "pass --preset or --model, not both" in capsys.readouterr().err


def test_a_list_flag_needs_a_value_and_a_type_it_cannot_parse_is_refused():
    import argparse

    from nanoseek.flags import add_dataclass_flags

    with pytest.raises(SystemExit):
        build_parser("eval").parse_args(["eval", "--lm-eval"])

    @dataclasses.dataclass
    class Unparseable:
        maybe: bool | None = flag("a tri-state", default=None)

    with pytest.raises(TypeError, match="cannot parse"):
        add_dataclass_flags(argparse.ArgumentParser(), Unparseable)


@pytest.mark.parametrize("key", ["", "   "])
def test_an_empty_admin_key_is_refused_at_start(key):
    """An unset variable (--admin-key "$ADMIN") once opened /metrics to a bare `Authorization: Bearer`."""
    from nanoseek.serve.config import ServeConfig

    with pytest.raises(ValueError, match="--admin-key"):
        ServeConfig(model="m", admin_key=key)
