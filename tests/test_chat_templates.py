"""Chat templates render as transformers' apply_chat_template renders them: loop controls, an
unescaped tojson with its options, strftime_now, raise_exception, every special token of the
tokenizer's files, add_generation_prompt, tools and documents, the {% generation %} block.

The expected texts were produced once by transformers (scripts/chat_template_expected.py) and
are stored in tests/data/chat_templates/expected.json; transformers is not needed here.
"""

import json
import shutil
from pathlib import Path

import pytest

from mamba2_cli import Mamba2Error
from mamba2_cli.chat import ChatTemplate
from mamba2_cli.tokenizer import Tokenizer

DATA = Path(__file__).parent / "data" / "chat_templates"
CASES = json.loads((DATA / "cases.json").read_text())
EXPECTED = json.loads((DATA / "expected.json").read_text())["cases"]
TOKENIZER = Path(__file__).parents[1] / "src" / "mamba2_cli" / "assets" / "tiny-code" / "tokenizer.json"


def template_for(case, tmp_path) -> ChatTemplate:
    shutil.copy(TOKENIZER, tmp_path / "tokenizer.json")
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **case["config"], "chat_template": case["template"]}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    return ChatTemplate(Tokenizer.from_dir(tmp_path))


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_rendering_matches_transformers(case, tmp_path):
    template = template_for(case, tmp_path)
    expected = EXPECTED[case["name"]]
    render = lambda: template.render(case["messages"], case["add_generation_prompt"], tools=case.get("tools"),  # noqa: E731
                                     documents=case.get("documents"))
    if "error" in expected:
        with pytest.raises(Mamba2Error, match="refused this conversation: " + expected["error"]):
            render()
    else:
        assert render() == expected["text"]


def test_the_bounds_still_hold_with_the_new_filters_and_globals(tmp_path):
    case = {"config": {}, "template": "{{ ('x' * 900000) | tojson(indent=1) }}{{ ('y' * 900000) | tojson }}"}
    with pytest.raises(Mamba2Error, match="passed 1,000,000 bytes"):
        template_for(case, tmp_path).render([])
    case["template"] = "{% for i in range(100000) %}{% for j in range(100000) %}{% continue %}{% endfor %}{% endfor %}"
    with pytest.raises(Mamba2Error, match="more than 2 s"):
        template_for(case, tmp_path).render([])
    case["template"] = "{{ strftime_now('%' + 'Y' * 2000000) }}"
    with pytest.raises(Mamba2Error, match="stopped"):
        template_for(case, tmp_path).render([])


def test_run_chat_renders_a_template_with_loop_controls_and_tojson(make_checkpoint):
    import subprocess
    import sys

    from test_cli import ENV

    d, _, _ = make_checkpoint("hf")
    config = json.loads((d / "tokenizer_config.json").read_text()) if (d / "tokenizer_config.json").exists() else {}
    config["chat_template"] = ("{% for m in messages %}{% if m.role == 'system' %}{% continue %}{% endif %}"
                               "{{ m | tojson }}{% endfor %}{% if add_generation_prompt %}>{% endif %}")
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    p = subprocess.run([sys.executable, "-m", "mamba2_cli", "run", "-m", str(d), "-n", "1", "--json", "--chat",
                        "--system", "hidden", "a <b> & c"], capture_output=True, env=ENV, timeout=120)
    assert p.returncode == 0, p.stderr.decode()
    tok = Tokenizer.from_dir(d)
    expected = '{"role": "user", "content": "a <b> & c"}>'
    assert json.loads(p.stdout)["prompt_tokens"] == len(tok.encode(expected, add_bos=False))
