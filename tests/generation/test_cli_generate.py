"""``hf-plugins generate`` with and without drafts, on a tiny saved model."""

import pytest

from hf_plugins import cli
from tests.contract.char_tokenizer import char_tokenizer
from tests.quantizers.tiny_models import tiny_model


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama")[0].save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    return str(folder)


def _run(capsys, *argv):
    code = cli.main(["generate", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_plain_and_self_draft_generations_print_the_same_text(model_folder, capsys):
    code, plain_out, plain_err = _run(capsys, model_folder, "def add(a, b):", "--max-new-tokens", "20")
    assert code == 0 and "20 tokens in" in plain_err and "acceptance" not in plain_err
    code, spec_out, spec_err = _run(capsys, model_folder, "def add(a, b):", "--max-new-tokens", "20",
                                    "--self-draft", "--self-draft-bits", "0", "--self-draft-layers", "1")
    assert code == 0 and "tokens per target forward" in spec_err
    assert plain_out.strip() and spec_out == plain_out


def test_bad_draft_length_is_a_clear_error(model_folder, capsys):
    code, _, err = _run(capsys, model_folder, "x", "--self-draft", "--num-draft-tokens", "many")
    assert code == 2 and "--num-draft-tokens must be 'auto' or an integer, got 'many'" in err
