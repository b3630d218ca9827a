"""The HTML report: one self-contained page for any run folder (`build.write_report`)."""
