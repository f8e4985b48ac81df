"""The settings model (msamil_core/settings.py) is the one home of every setting: the config's
defaults, config/config.yaml, each command's options, defaults and help, and the workflow's option
strings all derive from it. These tests walk every setting and fail when two layers disagree."""

from __future__ import annotations

import argparse
import dataclasses
import typing

import pytest
import yaml

from conftest import REPO
from msamil_core import settings as S
from msamil_core.cli import build_parser, commands
from msamil_core.cli.options import add_settings, dest, from_args
from msamil_core.errors import MsamilError


def sections() -> list[type]:
    """Every settings class of the model (the config's sections, their parts and entries)."""
    return [c for c in vars(S).values() if isinstance(c, type) and issubclass(c, S.Section) and c is not S.Section]


def parsers() -> dict[str, argparse.ArgumentParser]:
    return {name: build_parser(name)._subparsers._group_actions[0].choices[name] for name in commands()}


def settings_actions():
    """(command, action, settings class, field) of every option made from a setting."""
    classes = {c.__name__: c for c in sections()}
    for command, parser in parsers().items():
        for action in parser._actions:
            cls_name, _, name = action.dest.partition(".")
            if cls_name in classes:
                yield command, action, classes[cls_name], name


def test_config_yaml_is_the_rendered_model():
    """config/config.yaml is generated (`msamil config`): it holds every setting at its default,
    with its help; a setting added or changed in the model without regenerating it fails here."""
    assert (REPO / "config" / "config.yaml").read_text() == S.render_config()
    assert S.load_config(yaml.safe_load((REPO / "config" / "config.yaml").read_text())) == S.Config()


def test_every_field_is_typed_documented_and_has_one_default():
    for cls in sections():
        for f, tp in S.fields_of(cls):
            kind, optional = S.unwrap_optional(tp)
            assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help"
            default = S.default_of(f)
            if default is dataclasses.MISSING:
                continue
            if optional and default is not None and f.metadata.get("cli", True):
                # a command leaves a null setting out; its option's default must then be null too
                pytest.fail(f"{cls.__name__}.{f.name} may be null but defaults to {default!r}")
            if not S.is_section(kind):
                S.check_value(default, tp, f.metadata, f"{cls.__name__}.{f.name}")  # the default is valid


def test_every_command_option_of_a_setting_has_its_default_and_help():
    seen = set()  # the settings (dataclass fields, shared by a class and its subclasses) some command takes
    for command, action, cls, name in settings_actions():
        f = dict((g.name, g) for g, _ in S.fields_of(cls))[name]
        seen.add(id(f))
        assert f.metadata["help"].replace("%", "%%") in action.help, (command, action.dest)
        assert action.option_strings[0] == S.flag_of(f), (command, action.dest)
        if action.default is not None:  # commands that take the setting from a file have none
            assert action.default == S.default_of(f), (command, action.dest, action.default)
    # every setting a command can take is an option of at least one command
    for cls in sections():
        for f, tp in S.fields_of(cls):
            if f.metadata.get("cli", True) and not S.is_section(S.unwrap_optional(tp)[0]):
                assert id(f) in seen, f"{cls.__name__}.{f.name} is no command's option"


def test_no_command_declares_a_settings_option_by_hand():
    """An option named like a setting's flag is made from the setting (its dest says which), so a
    command cannot carry a default or help of its own for it."""
    flags = {S.flag_of(f) for cls in sections() for f, _ in S.fields_of(cls) if f.metadata.get("cli", True)}
    flags |= {f"--no-{flag[2:]}" for flag in flags}
    for command, parser in parsers().items():
        for action in parser._actions:
            for option in action.option_strings:
                if option in flags:
                    assert "." in action.dest, f"msamil {command}: {option} is declared by hand ({action.dest})"


def _other_value(f, tp):
    """A valid value of a setting other than its default (for the round trip)."""
    kind, _ = S.unwrap_optional(tp)
    meta, default = f.metadata, S.default_of(f)
    if kind is bool:
        return not default
    if meta.get("choices") and typing.get_origin(kind) is not list:
        return next(c for c in meta["choices"] if c != default)
    if typing.get_origin(kind) is list:
        item = typing.get_args(kind)[0]
        if meta.get("choices"):
            return list(meta["choices"][:1])
        if meta.get("length"):
            return [0.5] * meta["length"]
        return {int: [3, 2], float: [0.25, 0.5], str: ["a b", "c'd"]}[item]
    if kind is dict or typing.get_origin(kind) is dict:
        return {"x": 1, "y": "z"}
    if kind is str:
        return "some value/with space"
    lo = meta.get("min") if meta.get("min") is not None else (meta.get("above") or 0)
    hi = meta.get("max") if meta.get("max") is not None else meta.get("below")
    if kind is int:
        value = int(lo) + 1 if default != int(lo) + 1 else int(lo) + 2
        return min(value, int(hi)) if hi is not None and value > hi else value
    value = (lo + (hi if hi is not None else lo + 2)) / 2 or 0.5
    return value if value != default else value / 2


@pytest.mark.parametrize("cls", [c for c in sections() if any(f.metadata.get("cli", True) for f, _ in S.fields_of(c))],
                         ids=lambda c: c.__name__)
def test_option_strings_read_back_as_the_same_settings(cls):
    """What the workflow passes (cli_args) is read back by the options the commands declare
    (add_settings, from_args) as the very settings, every field at a value other than its default."""
    across = {"crop_size": 64, "holdout_fraction": 0.3, "val_fraction": 0.1}  # values the checks across fields take
    values = {}
    for f, tp in S.fields_of(cls):
        if f.metadata.get("cli", True) and not S.is_section(S.unwrap_optional(tp)[0]):
            values[f.name] = across.get(f.name, _other_value(f, tp))
    obj = dataclasses.replace(_make(cls), **values)
    parser = argparse.ArgumentParser()
    add_settings(parser, cls)
    args = parser.parse_args(S.cli_args(obj))
    assert from_args(args, cls, _make(cls)) == obj


def _make(cls):
    required = {f.name: "x" for f, _ in S.fields_of(cls) if S.default_of(f) is dataclasses.MISSING}
    return cls(**required)


def test_the_json_schema_takes_the_default_config_and_refuses_what_load_config_refuses():
    import jsonschema

    schema = S.json_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    defaults = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    assert list(validator.iter_errors(defaults)) == []
    demo = yaml.safe_load((REPO / "config" / "demo.yaml").read_text())
    assert list(validator.iter_errors(S.with_demo(defaults, demo))) == []
    for bad in ({"patches": {"patch_sise": 3}}, {"tissue": {"min_saturation": 2}}, {"patches": {"strategy": "x"}},
                {"e2e": [{"name": "r"}]}, {"encoders": {"e": {"mean": [1]}}}):
        assert list(validator.iter_errors(bad)), bad
        with pytest.raises(MsamilError):
            S.load_config(bad)


def test_yaml_1_1_numbers_and_typos_in_the_config_are_handled():
    config = S.load_config({"training": {"min_lr": "1e-6"}, "segmentation": {"lr": "2e-3"}})
    assert config.training.min_lr == 1e-6 and config.segmentation.lr == 0.002
    for bad, message in (
            ({"training": {"epochs": 2.5}}, "config: training.epochs must be a whole number, got 2.5"),
            ({"training": {"bf16": "yes"}}, "config: training.bf16 must be true or false, got 'yes'"),
            ({"training": {"train_fraction": 0}}, "config: training.train_fraction must be > 0 and <= 1, got 0.0"),
            ({"encoders": {"e": {"mean": [1, 2]}}}, "config: encoders.e.mean must have 3 values"),
            ({"experiments": [{"name": "a b"}]}, "config: experiments[a b].name 'a b' may hold only letters"),
            ({"tissue": {"mode": "brightfeld"}}, "did you mean 'brightfield'?"),
    ):
        with pytest.raises(MsamilError) as info:
            S.load_config(bad)
        assert message in str(info.value) and "\n" not in str(info.value)


def test_a_section_built_by_a_command_is_checked_like_the_config():
    with pytest.raises(MsamilError, match=r"tissue.min_saturation \(--min-saturation\) must be >= 0 and <= 1"):
        S.TissueSettings(min_saturation=2.0)
    with pytest.raises(MsamilError, match="unknown option 'lrr'; did you mean 'lr'"):
        S.TrainConfig.from_dict({"lrr": 1}, "--experiment")


def test_msamil_config_check_names_a_misspelt_key(tmp_path, capsys):
    from msamil_core.cli import main

    good, bad = tmp_path / "good.yaml", tmp_path / "bad.yaml"
    good.write_text("training: {epochs: 3}\n")
    bad.write_text("training: {epohcs: 3}\n")
    assert main(["config", "--check", str(REPO / "config" / "config.yaml"), str(good)]) == 0
    assert main(["config", "--check", str(bad)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["msamil config: error: config: unknown key `training.epohcs`; did you mean 'epochs'?"]
