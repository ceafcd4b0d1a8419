"""Config, placement and session state shared by coordinator and workers (no networking)."""
