"""Reading and presenting results: compare leaderboards, reports, re-scoring (ARCHITECTURE.md)."""
