"""FlowerTune's Alpaca prompt (trl formatting function of the FlowerTune LLM template): shared by
the data pipeline and the tiny profile's tokenizer, which therefore need not know each other."""

ALPACA_HEADER = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request."
)
PROMPT_TEMPLATE = ALPACA_HEADER + "\n### Instruction:\n{instruction}\n### Response:"
ALPACA_TEMPLATE = PROMPT_TEMPLATE + " {response}"


def format_prompt(instruction: str) -> str:
    return PROMPT_TEMPLATE.format(instruction=instruction)
