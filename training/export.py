"""Write the trained student as a Hugging Face model directory (full weights, safetensors)."""

import torch.distributed as dist

from core.files import atomic_directory


def export_student(engine, tokenizer, out_dir: str) -> None:
    """Gather the ZeRO-3 partitions and tensor-parallel shards of ``engine`` (any ZeRO stage) and save them.

    Every rank must call this (the gather is collective); rank 0 writes ``out_dir`` atomically:
    ``config.json``, ``model.safetensors`` and the tokenizer, loadable with
    ``AutoModelForCausalLM.from_pretrained(out_dir)``.
    """
    if engine.zero_optimization_stage() == 3 or engine.autotp_size() > 1:
        state_dict = engine._consolidated_16bit_state_dict()  # full tensors on rank 0, None elsewhere
    else:  # ZeRO-1/2 without tensor parallelism: every rank holds the whole model
        state_dict = {name: tensor.detach().cpu() for name, tensor in engine.module.state_dict().items()} \
            if dist.get_rank() == 0 else None
    if dist.get_rank() == 0:
        from transformers import AutoModelForCausalLM

        config = engine.module.config
        model = AutoModelForCausalLM.from_config(config, dtype=next(iter(state_dict.values())).dtype)
        missing, unexpected = model.load_state_dict(state_dict, strict=False)
        tied = {"lm_head.weight"} if config.get_text_config().tie_word_embeddings else set()
        if set(missing) - tied or unexpected:
            raise RuntimeError(f"export: weights do not match the model (missing {missing}, unexpected {unexpected})")
        with atomic_directory(out_dir, shared=True) as staging:
            model.save_pretrained(staging, safe_serialization=True)
            tokenizer.save_pretrained(staging)
    dist.barrier()
