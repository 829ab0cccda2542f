"""Sub-agents: the tool-calling loop and the built-in tools."""
