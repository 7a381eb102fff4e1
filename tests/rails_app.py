"""A small real Rails 6.1 app on Debian's gems (`ruby-rails`, `ruby-sqlite3`, `ruby-dalli`; no Bundler), written
as releases of a Capistrano tree: a model, migrations a test adds per release, SQLite under shared/, and one page
that shows its release, a value it cached with Rails.cache.fetch, and when its process finished booting.

The app is a few dozen small files: `template()` writes it once per test run under the system's temp directory
(outside the clone), and each release is a copy of it. Debian's Rails needs no build step, so nothing costly is kept
between runs."""

from __future__ import annotations

import shutil
from pathlib import Path

from conftest import ETC, App


def installed() -> bool:
    """Debian's Rails 6.1 with SQLite and Dalli (what `make test` installs)."""
    specs = Path("/usr/share/rubygems-integration")  # all/ for pure Ruby, <ABI>/ for compiled gems (sqlite3)
    return all(any(specs.glob(f"*/specifications/{gem}-[0-9]*.gemspec")) for gem in ("rails", "sqlite3", "dalli"))

FILES = {
    "config.ru": 'require_relative "config/environment"\nrun Rails.application\n',
    "Rakefile": 'require_relative "config/application"\nRails.application.load_tasks\n',
    "bin/rails": """#!/usr/bin/env ruby
APP_PATH = File.expand_path("../config/application", __dir__)
require_relative "../config/boot"
require "rails/commands"
""",
    "config/boot.rb": "# Debian's gems: no Bundler\n",
    "config/application.rb": """require_relative "boot"
require "rails"
require "active_record/railtie"
require "action_controller/railtie"

module Shop
  class Application < Rails::Application
    config.load_defaults 6.1
    config.eager_load = true
    config.cache_store = :mem_cache_store, ENV.fetch("MEMCACHE_SERVERS")
    config.secret_key_base = "0" * 64
    config.logger = Logger.new($stderr)
    config.log_level = :warn
    config.after_initialize { Object.const_set(:BOOTED_AT, Time.now.to_f) }
  end
end
""",
    "config/environment.rb": 'require_relative "application"\nRails.application.initialize!\n',
    "config/database.yml": """production:
  adapter: sqlite3
  database: <%= ENV.fetch("DATABASE_PATH") %>
  timeout: 5000
""",
    "config/routes.rb": """Rails.application.routes.draw do
  root "pages#show"
end
""",
    "app/models/application_record.rb":
        "class ApplicationRecord < ActiveRecord::Base\n  self.abstract_class = true\nend\n",
    "app/models/order.rb": "class Order < ApplicationRecord\nend\n",
    # Three cache reads: a store that read its version per cache call would cost three memcached gets, not one.
    "app/controllers/pages_controller.rb": """class PagesController < ActionController::Base
  def show
    greeting = Rails.cache.fetch("greeting") { "computed #{SecureRandom.hex(8)}" }
    Rails.cache.fetch("second") { 2 }
    Rails.cache.fetch("third") { 3 }
    response.headers["Cache-Control"] = "no-store"
    render plain: "release #{File.read(Rails.root.join("REVISION")).strip}\\n" \\
                  "cache #{greeting}\\nbooted #{BOOTED_AT}\\n"
  end
end
""",
    "db/migrate/20260101000000_create_orders.rb": """class CreateOrders < ActiveRecord::Migration[6.1]
  def change
    create_table :orders do |t|
      t.string :name
    end
    create_table :migration_runs do |t|
      t.string :version
      t.integer :uid
      t.string :current
    end
  end
end
""",
    "public/app.css": "body { color: #333 }\n",
    "tmp/.keep": "",
    "log/.keep": "",
}

# A migration that says who ran it and where `current` pointed meanwhile (so: as whom, and before the swap).
RECORDING_MIGRATION = """class {name} < ActiveRecord::Migration[6.1]
  def up
    current = File.readlink(File.expand_path("../../current", Rails.root))
    execute "INSERT INTO migration_runs (version, uid, current) VALUES ('{version}', #{{Process.uid}}, '#{{current}}')"
    {body}
  end
end
"""


def template(base: Path) -> Path:
    """Write the app once; `release()` copies it."""
    top = base / "rails-template"
    for name, text in FILES.items():
        path = top / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    (top / "bin/rails").chmod(0o755)
    (top / "config/initializers").mkdir()
    shutil.copy(ETC / "rails" / "maintd_cache.rb", top / "config/initializers/maintd_cache.rb")
    return top


def release(app: App, source: Path, name: str, migrations: dict[str, str] | None = None,
            marker: bool = True, files: dict[str, str] | None = None) -> Path:
    """A release `name` of the app, with extra migrations {version: body} and extra `files` {path: text}, written
    under a staging name and renamed into place as an uploader does, owned by the owner of releases/."""
    staging = app.releases / f".incoming-{name}"
    shutil.copytree(source, staging, symlinks=True)
    (staging / "REVISION").write_text(f"{name}\n")
    for path, text in (files or {}).items():
        (staging / path).write_text(text)
    for version, body in (migrations or {}).items():
        class_name = f"Step{version}"
        (staging / "db/migrate" / f"{version}_step{version}.rb").write_text(
            RECORDING_MIGRATION.format(name=class_name, version=version, body=body))
    return app.upload(staging, name, marker)
