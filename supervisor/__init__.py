"""The corral supervisor daemon (corrald); arrives with issue 5."""
