"""The plumbing behind the lesson: what a reader of model.py, distill.py, lora.py, train.py and
decode.py can skip.

    files.py        where files come from (fixtures, cache, PyPI wheels, URLs); writes that survive a kill
    weights.py      presets, the hub, GGUF and safetensors in, the Hugging Face folder and adapters out
    tokenizer.py    tiktoken-based tokenizer from tokenizer.json, tokenizer.model or GGUF metadata
    checkpoint.py   OUT/ckpt.pt: written only from a model that works, read back by --resume
    optim.py        AdamW with a float32 master copy, autocast, the memory estimate
    cpu_kernels.py  the CPU's fastest kernel for the few rows of a decode pass, the bfloat16 speed check
    sizing.py       how many masks and drafts a decode pass feeds: the most expected tokens per second
    timing.py       the best of a few timed calls, calls timed by turns, the machine's bandwidth and matmul rate
    step_timing.py  --amp auto's choice of precision, timed on the job; an MTP step against a plain one
    budget.py       --max-minutes and the stop signals behind one object, Budget
    processes.py    one process or several (torchrun): rank, device, log, rank 0's decisions
    cli.py          a parser whose errors are one line; train.py's checks of its settings, its recipe table

Of the lesson, this package imports only what it builds: the network (model.py) and the adapters
(lora.py). tests/test_layout.py holds the rule.
"""
