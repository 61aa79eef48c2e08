"""Training kvtier's embedded models: the corpus, the tokenizer, the recipes and the loop."""
