from infra.engines.completion import extract_completion, generation_start, trim_at_end_strings


def test_exact_prefix():
    c = extract_completion("Hello", "Hello world<|endoftext|>", ["<|endoftext|>"])
    assert (c.text, c.prompt_match, c.finish_reason) == (" world", "exact", "end_string")


def test_prompt_lost_its_head():
    # SentencePiece drops a leading space; a special token in the prompt vanishes on decode.
    prompt = " Tell me a long story about dragons please"
    reply = "Tell me a long story about dragons please. Once upon a time"
    c = extract_completion(prompt, reply, [])
    assert c.text == ". Once upon a time" and c.prompt_match == "heuristic"


def test_prompt_changed_inside_uses_its_tail():
    prompt = "Caf\u0065\u0301 menu: list three dishes served here"
    reply = "Café menu: list three dishes served here\n1. soup"
    start, how = generation_start(prompt, reply)
    assert how == "heuristic" and reply[start:] == "\n1. soup"


def test_no_match_keeps_everything_and_flags_it():
    c = extract_completion("abc", "xyz", [])
    assert (c.text, c.prompt_match) == ("xyz", "none")


def test_end_strings_first_one_wins_and_length_finish():
    assert trim_at_end_strings("a<extra_id_1>b\x11c", ["\x11", "<extra_id_1>"]) == ("a", True)
    c = extract_completion("p", "p and more", ["<|endoftext|>"])
    assert (c.text, c.finish_reason) == (" and more", "length")
