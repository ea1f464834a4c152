"""data_prep.science: man pages to plain text (the corpus build itself runs in docs/science.md)."""

from data_prep.science import _family, roff_to_text


def test_roff_to_text():
    src = ('.\\" comment\n.TH LS 1\n.SH NAME\nls \\- list directory contents\n.SH DESCRIPTION\n'
           '.B ls\nlists \\fBfiles\\fR and \\fIdirs\\fP\\(em fast.\n.de XX\nignored\n..\n.BR ls (1)\n')
    assert roff_to_text(src) == "NAME\nls - list directory contents\n\nDESCRIPTION\nls\nlists files and dirs-- fast.\nls(1)"
    assert roff_to_text(".so man1/other.1\n") is None


def test_command_family():
    assert _family("/usr/share/man/man1/gcloud-alpha-compute.1.gz") == "gcloud"
    assert _family("/usr/share/man/man3/SSL_read.3ssl.gz") == "ssl"
