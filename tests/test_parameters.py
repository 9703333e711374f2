"""One definition of a run's parameters (issue 23): RunParams. The flow's signature (the Prefect UI
form), the CLI's flags, the --params file's keys and docs/parameters.md are made from it; each
check here fails when one of them says something the model does not."""

import inspect
import json
from pathlib import Path

import pytest
from prefect.utilities.callables import parameter_schema

from flows.cli import RUN_COMMAND_FLAGS, build_parser, load_params_file, nested_names, run_parameters
from flows.generate import generate
from flows.params import RunParams, markdown, parameters
from infra.prompting.prompt_format import FORMATS
from infra.settings import Profile

DOC = Path(__file__).resolve().parents[1] / "docs" / "parameters.md"
CLI_ONLY = set(RUN_COMMAND_FLAGS)  # the run command's own flags, not parameters of a run


def run_flags() -> dict:
    run = build_parser()._subparsers._group_actions[0].choices["run"]
    return {a.dest: a for a in run._actions if a.option_strings and a.dest not in CLI_ONLY}


def test_every_parameter_has_a_description():
    assert [p.path for p in parameters() if not p.field.description] == []


def test_the_flow_signature_and_ui_form_are_the_model():
    schema = parameter_schema(generate).model_dump_for_openapi()
    assert list(inspect.signature(generate.fn).parameters) == list(RunParams.model_fields)
    assert list(schema["properties"]) == list(RunParams.model_fields)
    defaults = RunParams().model_dump(mode="json")
    for name, field in RunParams.model_fields.items():
        prop = schema["properties"][name]
        assert prop["description"] == field.description, name
        assert prop.get("default") == defaults[name], name
    for p in parameters():
        if p.group:  # a group's fields: the UI form's nested object, with the same descriptions
            nested = schema["definitions"][RunParams.model_fields[p.group].annotation.__name__]["properties"][p.name]
            assert nested.get("description") == p.field.description, p.path
    assert schema["properties"]["shard_size"]["default"] == 4000  # what the flow used before RunParams held it


def test_the_cli_flags_are_the_parameters():
    flags = run_flags()
    assert set(flags) == {p.flag for p in parameters()}
    for p in parameters():
        action = flags[p.flag]
        assert action.option_strings[0] == p.option
        assert action.default is None, p.path  # not given: the --params file's value, else the model's default
        assert action.help.startswith(f"{p.path}: {p.field.description}".replace("%", "%%")), p.path
        assert tuple(action.choices or ()) == tuple(p.choices or ()), p.path
    assert tuple(flags["prompt_format"].choices) == FORMATS


def test_the_settings_profile_and_the_flow_name_the_same_prompt_formats():
    assert Profile.model_fields["prompt_format"].annotation == RunParams.model_fields["prompt_format"].annotation


def sample_value(p):
    """A valid value other than the default, in the CLI's spelling and as the flow gets it."""
    if p.value_type is bool:
        return [p.option] if not p.default else ["--no-" + p.option[2:]], not p.default
    if p.repeated:
        return [p.option, "xy", p.option, "z"], ["xy", "z"]
    if p.json:  # an object parameter reaches the flow as its JSON text (Prefect reads a `$ref` object as a block's)
        return [p.option, '{"type": "object"}'], '{"type": "object"}'
    if p.choices:
        value = next(c for c in p.choices if c != p.default)
        return [p.option, value], value
    if p.value_type is int:
        value = 2 if p.default != 2 else 3
        return [p.option, str(value)], value
    if p.value_type is float:
        return [p.option, "0.5"], 0.5
    return [p.option, "t.jsonl"], "t.jsonl"


@pytest.mark.parametrize("p", parameters(), ids=lambda p: p.path)
def test_each_flag_and_file_key_reaches_its_parameter(p, tmp_path):
    argv, value = sample_value(p)
    from_flag = run_parameters(build_parser().parse_args(["run", *argv]))
    nested_as_flag = {p.group: {p.name: value}} if p.group else {p.name: value}
    assert from_flag == nested_as_flag
    path = tmp_path / "p.json"
    path.write_text(json.dumps({p.flag: value}))
    assert load_params_file(path) == nested_as_flag
    if p.group:
        assert nested_names()[p.flag] == (p.group, p.name)
        path.write_text(json.dumps({p.group: {p.name: value}}))
        assert load_params_file(path) == nested_as_flag


def test_the_file_takes_exactly_the_flags_the_flow_names_and_the_fields_own_names():
    nested = [p for p in parameters() if p.group]
    assert set(nested_names()) == {p.flag for p in nested} | {p.name for p in nested} - set(RunParams.model_fields)
    assert not set(nested_names()) & set(RunParams.model_fields)


def test_docs_parameters_md_is_current():
    """Regenerate with: python -m flows.params --markdown > docs/parameters.md"""
    assert DOC.read_text(encoding="utf-8") == markdown()
    for p in parameters():
        assert f"`{p.path}`" in DOC.read_text(encoding="utf-8") and p.option in DOC.read_text(encoding="utf-8")
