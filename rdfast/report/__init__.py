"""The statistics as text (`tables`) and as a report with figures (`page`)."""
