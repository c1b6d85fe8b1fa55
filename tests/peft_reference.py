"""The reference every backend is compared with: plain transformers + PeftModel, greedy, fp32."""

import torch


def peft_generate(model_path, adapter_dir, prompts, max_new_tokens):
    """One prompt at a time, greedy; returns (new token ids, text) per prompt.
    `adapter_dir` None = the base model."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, str(adapter_dir))
    model.eval()
    out = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a vLLM server beside us holds a core; two OMP threads would fight it
    try:
        for prompt in prompts:
            enc = tok(prompt, return_tensors="pt")
            with torch.no_grad():
                ids = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                     pad_token_id=tok.pad_token_id or tok.eos_token_id)
            new = ids[0, enc["input_ids"].shape[1]:].tolist()
            out.append((new, tok.decode(new, skip_special_tokens=True)))
    finally:
        torch.set_num_threads(threads)
    return out
