"""genframe's text data-processing layer: sources, cleaning, tokenizers and a token cache."""

from genframe.text.cache import token_cache
from genframe.text.cleaning import clean_documents, pseudonymize_text
from genframe.text.sources import load_documents
from genframe.text.tokenize import (
    BPETokenizer,
    CharTokenizer,
    build_tokenizer,
    load_tokenizer,
)

__all__ = [
    "BPETokenizer",
    "CharTokenizer",
    "build_tokenizer",
    "clean_documents",
    "load_documents",
    "load_tokenizer",
    "pseudonymize_text",
    "token_cache",
]
