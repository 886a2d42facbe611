"""The answer to a compaction request the relay serves itself (see :mod:`.compaction`)."""

from __future__ import annotations

from ..errors import UpstreamError
from .compaction import V1, seal
from .events import (
    Event,
    ReasoningDelta,
    TextDelta,
    ToolCallDelta,
    ToolCallEnd,
    ToolCallStart,
    TranslationContext,
)
from .responses import ResponsesEncoder, responses_usage


class CompactionEncoder(ResponsesEncoder):
    """The answer to a compaction request, from the events of its summary turn.

    The summary turn's text is kept, not streamed; reasoning and tool calls are dropped. When
    the upstream finishes, the client gets one ``compaction`` item (``output_item.added`` and
    ``.done``) carrying the sealed summary, then ``response.completed`` with the summary turn's
    usage, which is what the request is billed. Until then a v2 stream has only
    ``response.created``, ``response.in_progress`` and keep-alives. An upstream that wrote no
    summary fails the response (``compaction_failed``) rather than compact to nothing. A v1
    request's :meth:`body` is a ``response.compaction`` object (``retained``: the user
    messages it repeats), or raises :class:`~relay.errors.UpstreamError` if it failed; a v2
    request that did not stream gets the Response object.
    """

    def __init__(
        self, context: TranslationContext, upstream_kind: str, retained: list[dict] | None = None
    ) -> None:
        super().__init__(context, upstream_kind)
        self._summary: list[str] = []
        self._retained = retained or []

    def encode(self, event: Event) -> bytes:
        if self.closed:
            return b""
        if isinstance(event, TextDelta):
            self._summary.append(event.text)
            return self._begin()
        if isinstance(event, ReasoningDelta | ToolCallStart | ToolCallDelta | ToolCallEnd):
            return self._begin()
        return super().encode(event)

    def finish(self) -> bytes:
        if self.closed:
            return b""
        summary = "".join(self._summary).strip()
        if not summary:
            return self.fail(
                "The upstream model wrote no summary, so the conversation could not be "
                "compacted. Try again.",
                "compaction_failed",
            )
        out = self._begin()
        item = {"type": "compaction", "encrypted_content": seal(summary)}
        entry, added = self._add("compaction", "cmp", item)
        out += added + self._done(entry, {"id": entry.id, **item})
        self.closed = True
        self.final = self._response(
            "completed",
            output=self._items(),
            usage=responses_usage(self.usage),
            completed_at=self._context.created,
        )
        return out + self._event("response.completed", {"response": self.final})

    def body(self) -> dict:
        final = super().body()
        if self._context.compaction != V1:
            return final  # a v2 request that did not stream: a Response object
        if final.get("status") != "completed":
            error = final.get("error") or {}
            raise UpstreamError(
                str(error.get("message") or "The upstream could not compact the conversation."),
                code=str(error.get("code") or "compaction_failed"),
            )
        return {
            "id": final["id"],
            "object": "response.compaction",
            "created_at": final["created_at"],
            "output": [*self._retained, *final["output"]],
            "usage": final["usage"],
        }
