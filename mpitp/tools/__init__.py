"""Tools beside the reference: trace comparison (compare, hftrace) and the GGUF converter (convert and its
reader, model and tokenizer modules). They import the core; the core never imports them."""
