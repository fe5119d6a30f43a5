"""The system text a task gives the agent: the ReAct protocol, in this project's own words.

All tasks describe the protocol with this one function, so they differ only in goal, tools and
answer rule, and the text always matches the format the agent loop parses.
"""

from __future__ import annotations

from collections.abc import Sequence

TOOL_HELP = {
    "calculate": "calculate[expression] evaluates an arithmetic expression such as (12 + 8) * 3 / 4 "
    "and returns its value.",
    "search": "search[query] looks the query up and returns a few short passages; if they do not "
    "help, try a different query.",
}


def react_instructions(goal: str, tools: Sequence[str], answer_rule: str) -> str:
    """The system text for a task with this goal, these tools (names in TOOL_HELP) and answer rule."""
    return "\n".join(
        [
            goal,
            "",
            "Work step by step. Each reply has exactly two lines:",
            "Thought: what you know so far and what to do next.",
            "Action: one tool call, written as tool[argument].",
            'Stop after the Action line: the tool\'s result comes back as a line "Observation: ...".',
            "",
            "Tools:",
            *(f"- {TOOL_HELP[tool]}" for tool in tools),
            "- finish[answer] gives your final answer and ends the task.",
            "",
            f'Once you know the answer, reply with "Action: finish[answer]". {answer_rule}',
        ]
    )
