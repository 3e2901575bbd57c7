#include "data/brown.hpp"

#include <sstream>

namespace qopt {

std::string brown_to_text(const std::string& tagged) {
    std::istringstream in(tagged);
    std::string token, text;
    bool glue_next = true;  // no space before the first word
    while (in >> token) {
        const size_t slash = token.find_last_of('/');
        std::string word = (slash == std::string::npos || slash == 0) ? token : token.substr(0, slash);
        bool opening = false, closing = false;
        if (word == "``") {
            word = "\"";
            opening = true;
        } else if (word == "''") {
            word = "\"";
            closing = true;
        } else if (word == "(" || word == "[") {
            opening = true;
        } else if (word == "," || word == "." || word == ";" || word == ":" || word == "?" || word == "!" ||
                   word == ")" || word == "]" || word == "'") {
            closing = true;
        }
        if (!text.empty() && !glue_next && !closing) text += ' ';
        text += word;
        glue_next = opening;
    }
    return text;
}

}  // namespace qopt
