// Fleet console: small progressive enhancements (no inline scripts; the CSP allows only 'self').
"use strict";
document.addEventListener("submit", function (event) {
  // Destructive actions carry data-confirm on their submit button.
  var button = event.submitter || (event.target && event.target.querySelector("[data-confirm]"));
  var text = button && button.getAttribute("data-confirm");
  if (text && !window.confirm(text)) {
    event.preventDefault();
  }
});
