"""Write tests/data/chat_templates/expected.json: each case of cases.json rendered by transformers'
apply_chat_template, the reference tests/test_chat_templates.py compares mamba2's rendering with.

Run it with a Python that has transformers (it is not a dependency of mamba2):
    python scripts/chat_template_expected.py
"""

import json
import shutil
import tempfile
from pathlib import Path

from transformers import AutoTokenizer

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data" / "chat_templates"
TOKENIZER = ROOT / "src" / "mamba2_cli" / "assets" / "tiny-code" / "tokenizer.json"


def main() -> None:
    import transformers

    expected = {"transformers": transformers.__version__, "cases": {}}
    for case in json.loads((DATA / "cases.json").read_text()):
        with tempfile.TemporaryDirectory() as d:
            shutil.copy(TOKENIZER, Path(d) / "tokenizer.json")
            config = {"tokenizer_class": "PreTrainedTokenizerFast", **case["config"], "chat_template": case["template"]}
            (Path(d) / "tokenizer_config.json").write_text(json.dumps(config))
            tok = AutoTokenizer.from_pretrained(d)
            try:
                text = tok.apply_chat_template(case["messages"], tools=case.get("tools"), documents=case.get("documents"),
                                               add_generation_prompt=case["add_generation_prompt"], tokenize=False)
                expected["cases"][case["name"]] = {"text": text}
            except Exception as e:  # a template that raises: its message
                expected["cases"][case["name"]] = {"error": str(e)}
    (DATA / "expected.json").write_text(json.dumps(expected, indent=1, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
