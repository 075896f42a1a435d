"""The Bootfleet bus: configuration flows down from the controller, events flow up from services.

After the ZeroMQ guide's Clone pattern (chapter 5); see docs/architecture.md for the sockets and messages.
"""
