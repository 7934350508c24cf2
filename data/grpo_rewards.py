"""A user reward for the GRPO demo (configs/grpo-tiny.yaml), loaded as `data.grpo_rewards:digit_share`: the share of
the reply's non-space characters that are digits (the "reply with digits only" format, graded so that a random tiny
model gets some signal). Signature: (reply text, prompt row, generated token ids) -> float (train/rewards.py)."""


def digit_share(reply: str, row: dict, token_ids: list[int]) -> float:
    chars = [c for c in reply if not c.isspace()]
    return sum(c.isdigit() for c in chars) / len(chars) if chars else 0.0
