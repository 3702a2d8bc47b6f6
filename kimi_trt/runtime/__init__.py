"""Runtime: MPI launch, executors, generation, tokenizer, chat template, tool-call parsing, serving."""
