"""covidscan: COVID-19 detection on chest X-ray and CT by transfer learning.

Research use only. covidscan is not a medical device and must not be used for
diagnosis or treatment decisions.

Reproduces and extends Berrimi et al. (2021), "COVID-19 detection from Xray and CT
scans using transfer learning".
"""

__version__ = "0.1.0"
