"""Row formats: turn one input row into a (prompt, response) pair.

Without a `format` in the source's config the format is detected per row from its keys, so one file may mix
formats:

    Alpaca             {"instruction": ..., "input": ... (optional), "output": ...}
    ShareGPT           {"conversations": [{"from": "human", "value": ...}, {"from": "gpt", "value": ...}]}
    chat               {"messages": [{"role": "user", "content": ...}, {"role": "assistant", "content": ...}]}
                       (either key, with either from/value or role/content turns)
    prompt-completion  {"prompt": "...", "completion": "..."}, or TRL's conversational form with a list of
                       turns in each: {"prompt": [{"role": "user", ...}], "completion": [{"role": "assistant", ...}]}
    plain              {"prompt": ..., "response": ...}  or  {"question": ..., "answer": ...}

A `RowFormat` names the keys instead, in axolotl's vocabulary (`type`, `field_messages`, `roles`, ...), for data
whose keys are not the usual ones: ScaleBiO keeps its turns under `items`. Of a conversation, the last
assistant turn is the response and the last user turn before it the prompt; the system turn is kept in
`meta["system"]`, the turns between it and the prompt in `meta["history"]` (both rendered before the prompt:
tasks/conversation.py), and `meta["extra_turns"]` counts the turns besides the scored exchange and the system. Keys the format does not use (e.g. "label") are kept in
`Pair.meta`. A null value counts as a missing key, because Parquet and Hugging Face tables fill absent columns
with nulls.
"""
from __future__ import annotations

import typing
from dataclasses import dataclass, field

# what each role is called in the data when the config does not say; roles are compared in lower case
DEFAULT_ROLES = {"user": ("user", "human"), "assistant": ("assistant", "gpt"), "system": ("system",)}


class RowError(Exception):
    """A row that cannot be used; `reason` is one of the quarantine reasons, `field` names the culprit."""

    def __init__(self, reason: str, field: str = "", detail: str = ""):
        super().__init__(f"{reason}: {field}: {detail}")
        self.reason, self.field, self.detail = reason, field, detail


@dataclass
class Pair:
    prompt: str
    response: str
    prompt_field: str  # where the prompt came from, e.g. "instruction" or "conversations[1].value"
    response_field: str
    meta: dict = field(default_factory=dict)  # "system", "extra_turns", and the row's unused keys


@dataclass
class RowFormat:
    """How the rows of one source are laid out (the source's `format:` in the config)."""
    type: typing.Literal["chat", "alpaca", "prompt_completion"]
    field_messages: str = "messages"  # chat: the key holding the list of turns (ScaleBiO: items)
    role: str = "role"  # chat, and prompt_completion with turn lists: a turn's role key (ShareGPT: from)
    content: str = "content"  # ... and its text key (ShareGPT: value)
    # user/assistant/system -> the names the data uses besides that one, e.g. {user: [human], assistant: [gpt]}
    roles: dict[str, list[str]] = field(default_factory=dict)
    field_instruction: str = "instruction"  # alpaca
    field_input: str = "input"
    field_output: str = "output"
    field_prompt: str = "prompt"  # prompt_completion: two strings, or two lists of turns
    field_completion: str = "completion"


def to_pair(row, row_format: RowFormat | None = None) -> Pair:
    """The row's pair, read as `row_format` says or as its keys suggest; raises RowError for anything unusable."""
    if not isinstance(row, dict):
        raise RowError("unknown_format", "", f"expected an object, got {type(row).__name__}")
    if row_format is not None:
        return _mapped_pair(row, row_format)
    present = {k for k, v in row.items() if v is not None}
    for key, default_keys in (("conversations", ("from", "value")), ("messages", ("role", "content"))):
        if key in present:
            role_key, text_key = _turn_keys(row[key], default_keys)
            labels = ("human", "gpt") if role_key == "from" else ("user", "assistant")
            return _from_turns(row, key, role_key, text_key, _role_names({}), labels)
    if "instruction" in present:
        return _from_alpaca(row, "instruction", "input", "output")
    if "prompt" in present and "completion" in present:
        return _from_prompt_completion(row, "prompt", "completion", "role", "content", _role_names({}))
    if "prompt" in present:
        return _from_columns(row, "prompt", "response")
    if "question" in present:
        return _from_columns(row, "question", "answer")
    keys = ", ".join(sorted(map(str, row))[:20])
    raise RowError("unknown_format", "", f"no recognised keys among: {keys}")


def _mapped_pair(row: dict, fmt: RowFormat) -> Pair:
    roles = _role_names(fmt.roles)
    if fmt.type == "chat":
        return _from_turns(row, fmt.field_messages, fmt.role, fmt.content, roles, ("user", "assistant"))
    if fmt.type == "alpaca":
        return _from_alpaca(row, fmt.field_instruction, fmt.field_input, fmt.field_output)
    return _from_prompt_completion(row, fmt.field_prompt, fmt.field_completion, fmt.role, fmt.content, roles)


def text(value, field: str) -> str:
    """`value` as a usable string: present, a str, no NUL byte, encodable as UTF-8 (no lone surrogates)."""
    if value is None:
        raise RowError("missing_field", field, "missing or null")
    if not isinstance(value, str):
        raise RowError("wrong_type", field, f"expected a string, got {type(value).__name__}")
    if "\x00" in value:
        raise RowError("invalid_encoding", field, "contains a NUL byte")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:  # a lone surrogate from a "\ud800" escape in JSON
        raise RowError("invalid_encoding", field, str(e)) from None
    return value


def alpaca_prompt(instruction: str, extra_input: str) -> str:
    return f"{instruction}\n\n{extra_input}" if extra_input.strip() else instruction


def _unused(row: dict, used: set[str]) -> dict:
    return {k: v for k, v in row.items() if k not in used and v is not None}


def _from_alpaca(row: dict, instruction_key: str, input_key: str, output_key: str) -> Pair:
    instruction = text(row.get(instruction_key), instruction_key)
    extra_input = "" if row.get(input_key) is None else text(row[input_key], input_key)
    output = text(row.get(output_key), output_key)
    meta = _unused(row, {instruction_key, input_key, output_key})
    return Pair(alpaca_prompt(instruction, extra_input), output, instruction_key, output_key, meta)


def _from_columns(row: dict, prompt_key: str, response_key: str) -> Pair:
    prompt = text(row.get(prompt_key), prompt_key)
    response = text(row.get(response_key), response_key)
    return Pair(prompt, response, prompt_key, response_key, _unused(row, {prompt_key, response_key}))


def _from_prompt_completion(row: dict, prompt_key: str, completion_key: str, role_key: str, text_key: str,
                            roles: dict[str, set[str]]) -> Pair:
    """Two strings, or TRL's conversational form: the prompt's turns followed by the completion's."""
    prompt, completion = row.get(prompt_key), row.get(completion_key)
    if not isinstance(prompt, list) and not isinstance(completion, list):
        return _from_columns(row, prompt_key, completion_key)
    for key, value in ((prompt_key, prompt), (completion_key, completion)):
        if not isinstance(value, list):
            reason = "missing_field" if value is None else "wrong_type"
            raise RowError(reason, key, f"expected a list of turns like the other field, got {type(value).__name__}")
    turns = [(f"{prompt_key}[{i}]", t) for i, t in enumerate(prompt)]
    turns += [(f"{completion_key}[{i}]", t) for i, t in enumerate(completion)]
    return _pair_from_turns(turns, role_key, text_key, roles, (f"{prompt_key}.user", f"{completion_key}.assistant"),
                            _unused(row, {prompt_key, completion_key}))


def _from_turns(row: dict, key: str, role_key: str, text_key: str, roles: dict[str, set[str]],
                labels: tuple[str, str]) -> Pair:
    turns = row.get(key)
    if turns is None:
        raise RowError("missing_field", key, "missing or null")
    if not isinstance(turns, list):
        raise RowError("wrong_type", key, f"expected a list of turns, got {type(turns).__name__}")
    return _pair_from_turns([(f"{key}[{i}]", t) for i, t in enumerate(turns)], role_key, text_key, roles,
                            (f"{key}.{labels[0]}", f"{key}.{labels[1]}"), _unused(row, {key}))


def _pair_from_turns(turns: list[tuple[str, object]], role_key: str, text_key: str, roles: dict[str, set[str]],
                     missing: tuple[str, str], meta: dict) -> Pair:
    """The last assistant turn that follows a user turn -> response, the last user turn before it -> prompt;
    the turns before that prompt (but a system turn) -> meta["history"] as {role, content}, rendered before the
    prompt. `turns`: (where the turn is, e.g. "messages[2]", the turn); `missing`: the fields named when no
    user or no assistant turn is found."""
    kinds = [_kind(turn, where, role_key, roles) for where, turn in turns]
    user_name, assistant_name = (m.rsplit(".", 1)[-1] for m in missing)
    first_user = next((i for i, k in enumerate(kinds) if k == "user"), None)
    if first_user is None:
        raise RowError("missing_field", missing[0], f"no {user_name} turn")
    reply = next((i for i in reversed(range(first_user + 1, len(kinds))) if kinds[i] == "assistant"), None)
    if reply is None:
        raise RowError("missing_field", missing[1], f"no {assistant_name} turn after the first {user_name} turn")
    user = next(i for i in reversed(range(reply)) if kinds[i] == "user")
    prompt_field, response_field = f"{turns[user][0]}.{text_key}", f"{turns[reply][0]}.{text_key}"
    prompt = text(turns[user][1].get(text_key), prompt_field)
    response = text(turns[reply][1].get(text_key), response_field)
    system = next((i for i, k in enumerate(kinds) if k == "system"), None)
    if system is not None:
        meta["system"] = text(turns[system][1].get(text_key), f"{turns[system][0]}.{text_key}")
    history = [{"role": kinds[i], "content": text(turns[i][1].get(text_key), f"{turns[i][0]}.{text_key}")}
               for i in range(user) if i != system]
    if history:  # single-exchange rows keep exactly the meta they had before conversations were kept
        meta["history"] = history
    # turns besides the scored exchange and the system turn: the history, and any after the last reply
    meta["extra_turns"] = len(turns) - 2 - (system is not None)
    return Pair(prompt, response, prompt_field, response_field, meta)


def _kind(turn, where: str, role_key: str, roles: dict[str, set[str]]) -> str:
    """user, assistant or system, by the turn's role name; any other role (e.g. tool) as it is named."""
    if not isinstance(turn, dict):
        raise RowError("wrong_type", where, f"expected an object, got {type(turn).__name__}")
    name = text(turn.get(role_key), f"{where}.{role_key}").lower()
    return next((kind for kind, names in roles.items() if name in names), name)


def _role_names(configured: dict[str, list[str]]) -> dict[str, set[str]]:
    """Each role's names in lower case: its own, and the configured ones or else the defaults."""
    return {kind: {kind, *(n.lower() for n in configured.get(kind, defaults))}
            for kind, defaults in DEFAULT_ROLES.items()}


def _turn_keys(turns, default: tuple[str, str]) -> tuple[str, str]:
    """ShareGPT's from/value or chat's role/content, whichever the first turn uses (the key's usual one if
    neither: the error then names the field that is missing)."""
    first = next((t for t in turns if isinstance(t, dict)), {}) if isinstance(turns, list) else {}
    if "role" in first and "from" not in first:
        return "role", "content"
    if "from" in first and "role" not in first:
        return "from", "value"
    return default
