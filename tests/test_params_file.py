"""`run --params FILE`: the flags' names or the nested groups, as `--help` says (issue 27, defect 3)."""

import json

import pytest

from flows.cli import load_params_file, main, nested_names
from infra.errors import ConfigError


def write(tmp_path, data) -> str:
    path = tmp_path / "p.json"
    path.write_text(json.dumps(data) if not isinstance(data, str) else data)
    return path


def test_a_flags_top_level_name_goes_into_its_group(tmp_path):
    """The trial's file: `tokens_to_generate` at the top gave a SignatureMismatchError traceback."""
    params = load_params_file(write(tmp_path, {"input_uri": "t.jsonl", "profile": "local", "tokens_to_generate": 8,
                                               "recipe": {"prompt_template": "Ask about {{ topic }}"},
                                               "judge_template": "Rate {{ completion }}", "min_score": 3,
                                               "dedup_exact": True, "add_bos": True, "samples_per_prompt": 2}))
    assert params == {"input_uri": "t.jsonl", "profile": "local", "sampling": {"tokens_to_generate": 8, "add_BOS": True},
                      "recipe": {"prompt_template": "Ask about {{ topic }}", "samples_per_prompt": 2},
                      "judge": {"template": "Rate {{ completion }}", "min_score": 3}, "filters": {"dedup_exact": True}}


def test_every_run_flag_is_a_name_the_file_takes():
    """The CLI's flags and the file's names are one list: a flag added without a file name fails here."""
    from flows.cli import RUN_COMMAND_FLAGS, build_parser

    run = build_parser()._subparsers._group_actions[0].choices["run"]
    flags = {a.dest for a in run._actions if a.option_strings and a.dest not in RUN_COMMAND_FLAGS}
    import inspect

    from flows.generate import generate

    known = set(inspect.signature(generate.fn).parameters) | set(nested_names())
    assert flags - known == set()


@pytest.mark.parametrize("data, needle", [
    ({"input_uri": "t.jsonl", "tokens_to_generat": 8}, "unknown parameter 'tokens_to_generat'; did you mean 'tokens_to_generate'?"),
    ({"temperature": 0.5, "sampling": {"temperature": 0.7}}, "'temperature' (0.5) and sampling.temperature (0.7) disagree"),
    ([1, 2], "holds a JSON list"),
    ("{broken", "not readable as JSON"),
])
def test_a_wrong_file_is_one_line_naming_the_key(tmp_path, data, needle):
    with pytest.raises(ConfigError, match=None) as err:
        load_params_file(write(tmp_path, data))
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_the_cli_refuses_an_unknown_key_with_exit_2_and_no_traceback(tmp_path, capsys):
    code = main(["run", "--params", str(write(tmp_path, {"input_uri": "t.jsonl", "temprature": 0.5}))])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("nemotron-sdg run: --params") and "'temperature'" in err
