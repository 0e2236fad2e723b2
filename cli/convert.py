"""`fisao convert eva-clip`: make a verifier directory from an open_clip EVA01 checkpoint."""
from __future__ import annotations

import argparse


def _convert_eva_clip(args: argparse.Namespace) -> int:
    from fisao.models.eva_clip import convert_open_clip_checkpoint

    out = convert_open_clip_checkpoint(args.state_dict, args.tokenizer, args.image_processor, args.out,
                                       (args.vision_heads, args.text_heads), args.image_size)
    print(f"EVA-CLIP verifier written to {out}: set model.verifier: {out}")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    cv = sub.add_parser("convert", help="make a verifier directory").add_subparsers(dest="convert_command", required=True)
    eva = cv.add_parser("eva-clip", help="an open_clip EVA01 checkpoint -> InstructBLIP's verifier (fisao/models/eva_clip.py)")
    eva.add_argument("--state-dict", required=True, help="open_clip state dict (.bin/.pt or .safetensors)")
    eva.add_argument("--tokenizer", required=True, help="CLIP tokenizer, e.g. openai/clip-vit-large-patch14-336")
    eva.add_argument("--image-processor", required=True, help="the policy's, e.g. Salesforce/instructblip-vicuna-7b")
    eva.add_argument("--out", required=True)
    eva.add_argument("--vision-heads", type=int, default=16, help="EVA01-g-14: 16")
    eva.add_argument("--text-heads", type=int, default=12, help="EVA01-g-14: 12")
    eva.add_argument("--image-size", type=int, default=224)
    eva.set_defaults(func=_convert_eva_clip)
