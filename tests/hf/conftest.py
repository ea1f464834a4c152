"""tests/hf needs transformers and tokenizers (the hf and dev extras); the tokenizers they use are the
session's (tests/conftest.py)."""

import pytest

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
