"""Chat templates render under limits: a template that loops, multiplies or recurses far past any
conversation's needs stops quickly with an error naming the limit, instead of hanging."""
from __future__ import annotations

import time

import pytest

from velotune.tokenizer.chat_template import RenderLimits, TemplateLimitError, render

MESSAGES = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]


def rendered(template: str, limits: RenderLimits = RenderLimits()) -> str:
    return render(template, MESSAGES, add_generation_prompt=False, tools=None, documents=None,
                  variables={}, where="model.gguf", limits=limits)


@pytest.mark.parametrize("template, limit", [
    ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
     "its loops went past 100,000 range() items"),
    ("{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}",
     "its loops went past 100,000 range() items"),
    ("{% for c in 'ab' * 100000000 %}{% endfor %}", "'*' would build 200,000,000 items, past 50,000,000"),
    ("{{ 7 ** 100000000 }}", "'**' would make an integer of more than 65,536 bits"),
    ("{% macro f(n) %}{% if n %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}{{ f(40) }}",
     "rendering took more than 0.2 s"),
])
def test_a_runaway_template_stops_with_the_limit_named(template, limit):
    started = time.monotonic()
    with pytest.raises(TemplateLimitError) as info:
        rendered(template, RenderLimits(seconds=0.2))
    assert time.monotonic() - started < 5
    assert str(info.value) == (f"model.gguf: the chat template was stopped: {limit} (a limit no real chat "
                               "template comes near)")


def test_ordinary_templates_render_as_before():
    assert rendered("{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}") == "user: Hi\nassistant: Hello\n"
    assert rendered("{% for i in range(3) %}{{ loop.index }}/{{ loop.length }} {% endfor %}") == "1/3 2/3 3/3 "
    assert rendered("{{ '-' * 3 }}{{ 2 ** 10 }}") == "---1024"
    assert rendered("{{ range(3)|length }}{{ range(5)[2] }}{% for i in range(3)|reverse %}{{ i }}{% endfor %}") == "32210"
