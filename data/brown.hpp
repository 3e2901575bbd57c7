// The Brown corpus (form C, tagged) as plain running text. Each token is "word/tag"; the
// tag is dropped (text after the last '/'), `` and '' become ", and punctuation is joined
// the way it is printed: no space before , . ; : ? ! ) ] ' and closing quotes, none after
// opening quotes and ( [.
#pragma once
#include <string>

namespace qopt {

std::string brown_to_text(const std::string& tagged);

}  // namespace qopt
