"""Chat sessions for apps: harmony conversations with tools, streaming, cancellation, KV reuse.

    chat = model.chat(instructions="Be brief.", reasoning_effort="low", tools=[get_weather])
    reply = chat.send("Weather in Paris?")          # .final, .reasoning, .tool_calls, .stats
    for event in chat.stream("And in Rome?"): ...   # typed events as tokens arrive

Each turn prefills only what is new: the cache is cut back to the longest common token prefix
of what it holds and the new rendering (harmony drops earlier turns' reasoning when it
re-renders, so the reply of the previous turn is usually recomputed, never reused wrongly).
Sliding-window layers cannot be cut back by themselves; the session keeps small snapshots of
them at message boundaries and restores the nearest one (:mod:`mlx_gptoss.kvreuse`, which the
server's prompt cache shares).

A turn that fails changes nothing (options, text and the fitted prompt are checked before the
conversation changes; anything raised later, KeyboardInterrupt included, is rolled back). When
the conversation outgrows the context, the session's ``context_policy`` hides its oldest turns
from the model (they stay in ``messages``) or raises :class:`PromptTooLongError`.

Modules: :mod:`.session` (the conversation, its options and turns), :mod:`.reply` (one reply
generated and parsed; shared with the server's engine), :mod:`.context` (the context policy).
"""

from .context import CONTEXT_POLICIES as CONTEXT_POLICIES
from .context import context_size as context_size
from .reply import Done as Done
from .reply import Reply as Reply
from .reply import generate_reply as generate_reply
from .session import DEFAULT_MAX_TOKENS as DEFAULT_MAX_TOKENS
from .session import ChatSession as ChatSession
