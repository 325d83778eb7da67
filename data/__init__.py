"""Data: the embedded demo corpus, tokenizer training, preparation and resumable sampling."""
