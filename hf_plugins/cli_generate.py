"""``hf-plugins generate``: a continuation of one prompt, streamed with a live tokens/s readout, optionally
through speculative decoding with a draft checkpoint or a self-draft. Uses only the public API."""

from __future__ import annotations

import argparse
import sys
import time

from tqdm.auto import tqdm


def add_generate_parser(sub) -> None:
    """Register the ``generate`` sub-command on an ``argparse`` sub-parsers object."""
    generate = sub.add_parser("generate", help="continue a prompt (plain or speculative), live tokens/s")
    generate.add_argument("model", help="a model folder or a packaged model id (e.g. qwen2.5-coder-1.5b)")
    generate.add_argument("prompt")
    generate.add_argument("--max-new-tokens", type=int, default=48)
    drafts = generate.add_mutually_exclusive_group()
    drafts.add_argument("--draft", help="draft model folder or packaged id sharing the tokenizer")
    drafts.add_argument("--self-draft", action="store_true", help="draft derived from the model itself")
    generate.add_argument("--self-draft-bits", type=int, default=4, help="self-draft weight bits; 0 keeps float")
    generate.add_argument("--self-draft-layers", type=int, default=None, help="self-draft layer count (layer skip)")
    generate.add_argument("--draft-bits", type=int, default=0, help="quantize --draft to this many bits (0: as is)")
    generate.add_argument("--num-draft-tokens", default="auto", help="'auto' (adaptive) or a fixed count")
    generate.add_argument("--layer-parallel", type=int, default=1, help="EasySpec layer group size of the draft")
    generate.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    generate.add_argument("--temperature", type=float, default=1.0)
    generate.add_argument("--top-p", type=float, default=1.0)


class _LiveReadout:
    """A streamer printing finished lines above a tqdm bar that counts tokens and shows tokens/s."""

    def __init__(self, tokenizer, total: int) -> None:
        self.tokenizer = tokenizer
        self.bar = tqdm(total=total, unit="tok", file=sys.stderr, dynamic_ncols=True)
        self.ids: list[int] = []
        self.printed = 0
        self.prompt_seen = False

    def put(self, value) -> None:
        if not self.prompt_seen:  # the first call carries the prompt
            self.prompt_seen = True
            return
        tokens = value.reshape(-1).tolist()
        self.ids += tokens
        self.bar.update(len(tokens))
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        newline = text.rfind("\n", self.printed)
        if newline >= 0:
            self.bar.write(text[self.printed : newline])
            self.printed = newline + 1

    def end(self) -> None:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text[self.printed :]:
            self.bar.write(text[self.printed :])
        self.bar.close()


def _num_draft_tokens(value: str):
    if value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"--num-draft-tokens must be 'auto' or an integer, got {value!r}.") from None


def run_generate(args: argparse.Namespace, load_any) -> int:
    """Load, build the draft, generate with the live readout, print the summary (and speculative metrics)."""
    import torch

    from . import SpeculativeConfig, enable_speculative, self_draft

    model, tokenizer = load_any(args.model)
    draft = None
    if args.draft:
        draft, _ = load_any(args.draft)
        if args.draft_bits:
            draft = self_draft(draft, bits=args.draft_bits)
    elif args.self_draft:
        draft = self_draft(model, bits=args.self_draft_bits or None, layers=args.self_draft_layers)
    kwargs = dict(max_new_tokens=args.max_new_tokens, do_sample=args.sample, return_dict_in_generate=True)
    if args.sample:
        kwargs.update(temperature=args.temperature, top_p=args.top_p)
    if draft is not None:
        enable_speculative(model)
        kwargs.update(assistant_model=draft, speculative_config=SpeculativeConfig(
            num_draft_tokens=_num_draft_tokens(args.num_draft_tokens), layer_parallel_group_size=args.layer_parallel))
    inputs = tokenizer(args.prompt, return_tensors="pt")
    print(args.prompt, file=sys.stderr)
    streamer = _LiveReadout(tokenizer, args.max_new_tokens)
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(**inputs, streamer=streamer, **kwargs)
    seconds = time.perf_counter() - start
    new_tokens = out.sequences.shape[1] - inputs.input_ids.shape[1]
    summary = f"{new_tokens} tokens in {seconds:.1f} s: {new_tokens / seconds:.2f} tokens/s"
    stats = getattr(out, "speculative_stats", None)
    if stats:
        summary += (f"; acceptance {stats['acceptance_rate']:.2f}, {stats['tokens_per_target_forward']:.2f} tokens "
                    f"per target forward, {stats['draft_seconds'] / seconds:.0%} of the time drafting")
    print(summary, file=sys.stderr)
    return 0
