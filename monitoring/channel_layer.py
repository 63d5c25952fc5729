"""Channels' in-memory layer, with overflow reporting on group_send."""

from channels.exceptions import ChannelFull
from channels.layers import InMemoryChannelLayer

from monitoring.events import report_overflow


class ReportingInMemoryChannelLayer(InMemoryChannelLayer):
    """The in-memory layer of Channels 4.3, whose group_send reports each message dropped on a full channel.

    Channels' own group_send drops such messages silently. The capacity
    setting still bounds every channel's queue, because `send` raises
    ChannelFull instead of growing it.
    """

    async def group_send(self, group, message):
        assert isinstance(message, dict), "Message is not a dict"
        self.require_valid_group_name(group)
        self._clean_expired()
        dropped = 0
        for channel in list(self.groups.get(group, {})):
            try:
                await self.send(channel, message)
            except ChannelFull:
                dropped += 1
        if dropped:
            report_overflow(group, dropped=dropped)
