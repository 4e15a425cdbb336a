import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# a report section or figure that fails to render fails the test instead of becoming an error note
os.environ["LANGNEURONS_STRICT_REPORT"] = "1"
sys.path.insert(0, str(Path(__file__).parent))

from tiny import make_model, make_tokenizer  # noqa: E402


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="session")
def llama(tokenizer):
    return make_model("llama", vocab_size=len(tokenizer))
